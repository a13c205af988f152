//! One line for an error and its causes: how tcplake prints and logs an error. Errors keep their
//! causes as sources (never flattened into strings); whoever shows one to a person uses this.

/// The error's message, then each cause it does not already say (some wrapped errors repeat their
/// source in their own message), joined with `: `.
pub fn one_line(e: &(dyn std::error::Error + 'static)) -> String {
    let mut line = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !text.is_empty() && !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        cause = c.source();
    }
    line.replace('\n', " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] Middle);
    #[derive(Debug, thiserror::Error)]
    #[error("middle: inner")]
    struct Middle(#[source] std::io::Error);

    #[test]
    fn every_cause_once() {
        let e = Outer(Middle(std::io::Error::other("inner")));
        assert_eq!(one_line(&e), "outer: middle: inner");
    }
}
