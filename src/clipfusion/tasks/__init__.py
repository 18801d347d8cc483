"""What the command-line commands do, as functions: evaluate, demo, predict, fit, sweep, benchmark."""
