//! The benchmark's results: a table for people, JSON for tools.

use serde::Serialize;

/// What a metric should be.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    /// At most this.
    AtMost(f64),
    /// At least this.
    AtLeast(f64),
}

impl Target {
    /// Whether `value` meets it.
    pub fn met(self, value: f64) -> bool {
        match self {
            Target::AtMost(t) => value <= t,
            Target::AtLeast(t) => value >= t,
        }
    }
}

/// One measured figure.
#[derive(Debug, Clone, Serialize)]
pub struct Metric {
    /// A stable key, e.g. `latency_p50_ms`.
    pub key: String,
    /// What it is, for the table.
    pub name: String,
    /// The figure; `None` when it could not be measured (see `note`).
    pub value: Option<f64>,
    /// Its unit: `ms`, `s`, `MiB`, `%`, `/s`, `agents`, ...
    pub unit: String,
    /// What it should be.
    pub target: Option<Target>,
    /// Whether it is; `None` without a target or a value.
    pub met: Option<bool>,
    /// How it was measured, or why it is missing.
    pub note: String,
}

/// Everything one run measured.
#[derive(Debug, Default, Serialize)]
pub struct Report {
    /// The figures, in the order measured.
    pub metrics: Vec<Metric>,
    /// Where and how: machine, versions, parameters.
    pub context: serde_json::Map<String, serde_json::Value>,
}

impl Report {
    /// Records a figure.
    pub fn push(
        &mut self,
        key: &str,
        name: &str,
        value: Option<f64>,
        unit: &str,
        target: Option<Target>,
        note: impl Into<String>,
    ) {
        let met = match (target, value) {
            (Some(t), Some(v)) => Some(t.met(v)),
            _ => None,
        };
        self.metrics.push(Metric {
            key: key.to_string(),
            name: name.to_string(),
            value,
            unit: unit.to_string(),
            target,
            met,
            note: note.into(),
        });
    }

    /// Records a figure that could not be measured.
    pub fn missing(
        &mut self,
        key: &str,
        name: &str,
        unit: &str,
        target: Option<Target>,
        why: &str,
    ) {
        self.push(key, name, None, unit, target, why);
    }

    /// The figure recorded under `key`.
    pub fn value(&self, key: &str) -> Option<f64> {
        self.metrics
            .iter()
            .find(|m| m.key == key)
            .and_then(|m| m.value)
    }

    /// The table: metric, value, target, met.
    pub fn table(&self) -> String {
        let rows: Vec<[String; 4]> = self
            .metrics
            .iter()
            .map(|m| {
                [
                    m.name.clone(),
                    m.value
                        .map_or_else(|| "n/a".to_string(), |v| format_value(v, &m.unit)),
                    m.target.map_or_else(String::new, |t| match t {
                        Target::AtMost(x) => format!("≤ {}", format_value(x, &m.unit)),
                        Target::AtLeast(x) => format!("≥ {}", format_value(x, &m.unit)),
                    }),
                    match m.met {
                        Some(true) => "yes".to_string(),
                        Some(false) => "NO".to_string(),
                        None => String::new(),
                    },
                ]
            })
            .collect();
        let header = ["metric", "value", "target", "met?"];
        let mut width = header.map(|h| h.chars().count());
        for r in &rows {
            for (w, c) in width.iter_mut().zip(r) {
                *w = (*w).max(c.chars().count());
            }
        }
        let line = |cells: &[String; 4]| {
            let mut s = String::from("|");
            for (c, w) in cells.iter().zip(width) {
                let pad = w - c.chars().count();
                s.push_str(&format!(" {c}{} |", " ".repeat(pad)));
            }
            s.push('\n');
            s
        };
        let mut out = line(&header.map(str::to_string));
        out.push_str(&line(&width.map(|w| "-".repeat(w))));
        for r in &rows {
            out.push_str(&line(r));
        }
        out
    }
}

/// A value with its unit, rounded for reading.
pub fn format_value(v: f64, unit: &str) -> String {
    let digits = match unit {
        "ms" if v < 10.0 => 2,
        "ms" => 1,
        "s" => 2,
        "MiB" => 1,
        "%" => 2,
        _ if v.fract() == 0.0 => 0,
        _ if v >= 100.0 => 0,
        _ => 2,
    };
    let n = format!("{v:.digits$}");
    let n = if v.abs() >= 10_000.0 && digits == 0 {
        group_thousands(&n)
    } else {
        n
    };
    match unit {
        "" => n,
        "%" => format!("{n} %"),
        "/s" => format!("{n} /s"),
        u => format!("{n} {u}"),
    }
}

fn group_thousands(digits: &str) -> String {
    let (sign, d) = digits
        .strip_prefix('-')
        .map_or(("", digits), |rest| ("-", rest));
    let mut out = String::new();
    for (i, c) in d.chars().enumerate() {
        if i > 0 && (d.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    format!("{sign}{out}")
}

/// The `q` quantile (0..=1) of `sorted` (ascending), nearest-rank.
pub fn quantile(sorted: &[f64], q: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_marks_targets_and_missing_values() {
        let mut r = Report::default();
        r.push(
            "p50",
            "latency p50",
            Some(0.84),
            "ms",
            Some(Target::AtMost(1.0)),
            "",
        );
        r.push(
            "rss",
            "server RSS",
            Some(1500.0),
            "MiB",
            Some(Target::AtMost(1024.0)),
            "",
        );
        r.push("n", "agents", Some(10_000.0), "agents", None, "");
        r.missing("x", "not run", "ms", None, "skipped");
        let t = r.table();
        assert!(t.contains("| latency p50 | 0.84 ms"), "{t}");
        assert!(t.contains("≤ 1.00 ms"), "{t}");
        assert!(t.contains("| NO"), "{t}");
        assert!(t.contains("10,000 agents"), "{t}");
        assert!(t.contains("n/a"), "{t}");
        assert_eq!(r.value("p50"), Some(0.84));
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["metrics"][1]["met"], false);
        assert_eq!(json["metrics"][0]["target"]["at_most"], 1.0);
    }

    #[test]
    fn quantiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=200).map(f64::from).collect();
        assert_eq!(quantile(&v, 0.5), Some(100.0));
        assert_eq!(quantile(&v, 0.99), Some(198.0));
        assert_eq!(quantile(&v, 1.0), Some(200.0));
        assert_eq!(quantile(&[], 0.5), None);
    }
}
