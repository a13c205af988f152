"""pyarrow's Parquet writer on tcplake's own event rows: the baseline for tcplake's pipeline cost.

Usage: python3 bench/pyarrow_writer.py OUTPUT_DIR [ROUNDS]

Loads every committed row of OUTPUT_DIR/events (a tcplake output) into memory, then times
`pyarrow.parquet.write_table` on one thread writing them as one file, twice per round: with pyarrow's
defaults plus zstd, and with tcplake's own settings (zstd level 1, no dictionary on the high-cardinality
columns, delta encoding on ts/seq/sock_id, page statistics and page index). Prints one JSON line:
rows, and per variant the best rows/s and the bytes written.
"""
import json
import os
import sys
import tempfile
import time

import pyarrow as pa
import pyarrow.parquet as pq
from deltalake import DeltaTable

pa.set_cpu_count(1)
pa.set_io_thread_count(1)

out = sys.argv[1]
rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
# The committed files' rows (the Delta snapshot), without the partition columns tcplake derives from ts.
files = DeltaTable(os.path.join(out, "events")).file_uris()
table = pa.concat_tables(pq.read_table(f) for f in files).combine_chunks()
table = table.drop_columns([c for c in ("date", "hour") if c in table.column_names])
rows = table.num_rows

HIGH = ["ts", "seq", "sock_id", "bytes", "srtt_us"]
variants = {
    "pyarrow_defaults_zstd": dict(compression="zstd"),
    "tcplake_settings": dict(
        compression="zstd",
        compression_level=1,
        use_dictionary=[c for c in table.column_names if c not in HIGH],
        column_encoding={"ts": "DELTA_BINARY_PACKED", "seq": "DELTA_BINARY_PACKED",
                         "sock_id": "DELTA_BINARY_PACKED"},
        write_statistics=True,
        write_page_index=True,
        row_group_size=131072,
    ),
}
result = {"rows": rows}
with tempfile.TemporaryDirectory() as tmp:
    for name, kw in variants.items():
        best = None
        path = os.path.join(tmp, name + ".parquet")
        for _ in range(rounds):
            t = time.perf_counter()
            pq.write_table(table, path, **kw)
            dt = time.perf_counter() - t
            best = dt if best is None else min(best, dt)
        result[name] = {"rows_per_sec": rows / best, "bytes": os.path.getsize(path)}
print(json.dumps(result))
