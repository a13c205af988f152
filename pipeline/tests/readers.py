"""Totals of a tcplake output as other lake engines read it (tests/it/lake_readers.rs).

Usage: readers.py OUT ENGINE[,ENGINE...]   (engines: deltalake, polars, spark)
Prints one JSON object: engine -> [event rows, sum(events.bytes), flow rows, sum(flows.events),
sum(flows.bytes_sent + bytes_received)].

Spark reads the Parquet files of the table's current snapshot (listed by delta-rs): Spark's own Delta
reader (delta-spark) comes from Maven, which is not reachable here.
"""
import json, sys
out = sys.argv[1]
which = sys.argv[2].split(",")
res = {}
from deltalake import DeltaTable
import pyarrow.compute as pc

def tot(ev_rows, ev_bytes, fl_rows, fl_events, fl_bytes):
    return [int(ev_rows), int(ev_bytes), int(fl_rows), int(fl_events), int(fl_bytes)]

if "deltalake" in which:
    ev = DeltaTable(f"{out}/events").to_pyarrow_table(columns=["bytes"])
    fl = DeltaTable(f"{out}/flows").to_pyarrow_table(columns=["events", "bytes_sent", "bytes_received"])
    s = lambda t, c: pc.sum(t[c]).as_py() or 0
    res["deltalake"] = tot(ev.num_rows, s(ev, "bytes"), fl.num_rows, s(fl, "events"), s(fl, "bytes_sent") + s(fl, "bytes_received"))
if "polars" in which:
    import polars as pl
    ev = pl.read_delta(f"{out}/events", columns=["bytes"])
    fl = pl.read_delta(f"{out}/flows", columns=["events", "bytes_sent", "bytes_received"])
    res["polars"] = tot(ev.height, ev["bytes"].sum(), fl.height, fl["events"].sum(), fl["bytes_sent"].sum() + fl["bytes_received"].sum())
if "spark" in which:
    from pyspark.sql import SparkSession, functions as F
    spark = (SparkSession.builder.master("local[1]").appName("tcplake-readers")
             .config("spark.ui.enabled", "false").config("spark.sql.session.timeZone", "UTC")
             .getOrCreate())
    spark.sparkContext.setLogLevel("ERROR")
    ev = spark.read.parquet(*DeltaTable(f"{out}/events").file_uris())
    fl = spark.read.parquet(*DeltaTable(f"{out}/flows").file_uris())
    e = ev.agg(F.count("*"), F.coalesce(F.sum("bytes"), F.lit(0))).first()
    f = fl.agg(F.count("*"), F.sum("events"), F.sum(F.col("bytes_sent") + F.col("bytes_received"))).first()
    res["spark"] = tot(e[0], e[1], f[0], f[1], f[2])
    spark.stop()
print(json.dumps(res))
