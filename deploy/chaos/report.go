package main

import (
	"fmt"
	"io"
	"strings"
	"time"
)

// Row is one line of the report's table: a fault (or a check), when it
// began relative to the start of the run, what clients saw while it
// lasted, and how it ended.
type Row struct {
	Fault   string
	When    time.Duration
	Effect  string
	Outcome string
	// Failed marks a row whose outcome fails the run.
	Failed bool
}

// Report is what the run prints: the fault table, then the checks, then a
// summary line per figure.
type Report struct {
	Faults  []Row
	Checks  []Row
	Summary []string
}

// Failed reports whether any row failed.
func (r *Report) Failed() bool {
	for _, rows := range [][]Row{r.Faults, r.Checks} {
		for _, row := range rows {
			if row.Failed {
				return true
			}
		}
	}
	return false
}

// Write renders r as two plain-text tables and the summary.
func (r *Report) Write(w io.Writer) error {
	var b strings.Builder
	writeTable(&b, []string{"fault", "when", "effect", "outcome"}, r.Faults)
	b.WriteString("\n")
	writeTable(&b, []string{"check", "when", "found", "outcome"}, r.Checks)
	b.WriteString("\n")
	for _, s := range r.Summary {
		b.WriteString(s)
		b.WriteString("\n")
	}
	verdict := "PASS"
	if r.Failed() {
		verdict = "FAIL"
	}
	fmt.Fprintf(&b, "result: %s\n", verdict)
	_, err := io.WriteString(w, b.String())
	return err
}

// writeTable writes rows under header, each column as wide as its widest
// cell; a failed row's outcome is prefixed with "FAIL: ".
func writeTable(b *strings.Builder, header []string, rows []Row) {
	cells := [][]string{header}
	for _, r := range rows {
		out := r.Outcome
		if r.Failed {
			out = "FAIL: " + out
		}
		cells = append(cells, []string{r.Fault, formatWhen(r.When), r.Effect, out})
	}
	width := make([]int, len(header))
	for _, row := range cells {
		for i, c := range row {
			width[i] = max(width[i], len(c))
		}
	}
	line := func(row []string) {
		for i, c := range row {
			if i == len(row)-1 {
				b.WriteString(c)
				break
			}
			b.WriteString(c)
			b.WriteString(strings.Repeat(" ", width[i]-len(c)+2))
		}
		b.WriteString("\n")
	}
	line(cells[0])
	sep := make([]string, len(header))
	for i := range sep {
		sep[i] = strings.Repeat("-", width[i])
	}
	line(sep)
	for _, row := range cells[1:] {
		line(row)
	}
}

// formatWhen renders an offset from the start of the run as +mm:ss.
func formatWhen(d time.Duration) string {
	if d < 0 {
		d = 0
	}
	s := int(d.Round(time.Second) / time.Second)
	return fmt.Sprintf("+%02d:%02d", s/60, s%60)
}
