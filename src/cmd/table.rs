//! Tables on the terminal: columns as wide as their widest cell, so ids of any length (a
//! 36-character agent id, a 32-character job id) keep the columns straight.

/// Prints rows under a header (see [`format_table`]).
pub fn print_table<const N: usize>(header: [&str; N], rows: &[[String; N]]) {
    print!("{}", format_table(header, rows));
}

/// Rows under a header, each column as wide as its widest cell and two spaces apart; the
/// last column is not padded. One line per row, each ending in a newline.
pub fn format_table<const N: usize>(header: [&str; N], rows: &[[String; N]]) -> String {
    let mut widths = header.map(|h| h.chars().count());
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let mut text = String::new();
        for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
            if i + 1 == N {
                text.push_str(cell);
            } else {
                text.push_str(&format!("{cell:<w$}  "));
            }
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn columns_fit_their_widest_cell() {
        let long = "0e21823d-8398-4454-94b3-06fdcc994717".to_string();
        let text = super::format_table(
            ["agent", "state", "output"],
            &[
                [long.clone(), "SUCCEEDED".into(), "Linux".into()],
                ["a".into(), "FAILED".into(), "".into()],
            ],
        );
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], format!("{:<36}  state      output", "agent"));
        assert_eq!(lines[1], format!("{long}  SUCCEEDED  Linux"));
        assert_eq!(lines[2], format!("{:<36}  FAILED", "a"));
    }
}
