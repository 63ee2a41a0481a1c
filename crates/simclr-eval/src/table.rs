//! Markdown tables padded so they also read well as plain text in a terminal.

/// Column alignment.
#[derive(Clone, Copy)]
pub(crate) enum Align {
    Left,
    Right,
}

/// Renders a Markdown table with every column padded to its widest cell.
pub(crate) fn markdown_table(headers: &[String], align: &[Align], rows: &[Vec<String>]) -> String {
    let widths: Vec<usize> = (0..headers.len())
        .map(|col| {
            rows.iter()
                .map(|r| r[col].chars().count())
                .chain(std::iter::once(headers[col].chars().count()))
                .max()
                .unwrap_or(0)
                .max(3)
        })
        .collect();
    let line = |cells: &[String]| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .zip(align)
            .map(|((cell, &w), a)| match a {
                Align::Left => format!("{cell:<w$}"),
                Align::Right => format!("{cell:>w$}"),
            })
            .collect();
        format!("| {} |\n", padded.join(" | "))
    };
    let mut out = line(headers);
    let rule: Vec<String> = widths
        .iter()
        .zip(align)
        .map(|(&w, a)| match a {
            Align::Left => format!(":{}", "-".repeat(w - 1)),
            Align::Right => format!("{}:", "-".repeat(w - 1)),
        })
        .collect();
    out.push_str(&format!("| {} |\n", rule.join(" | ")));
    for row in rows {
        out.push_str(&line(row));
    }
    out
}

/// Makes a class name safe inside a Markdown table cell.
pub(crate) fn escape(name: &str) -> String {
    name.replace('|', "\\|").replace(['\n', '\r'], " ")
}

/// A fraction in `[0, 1]` as a percentage with two decimals.
pub(crate) fn percent(fraction: f64) -> String {
    format!("{:.2}%", fraction * 100.0)
}
