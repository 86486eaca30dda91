"""Long-context evaluation suite behind `gemserve eval`: tasks, haystacks, scoring, runner and reports."""
