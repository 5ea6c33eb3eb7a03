"""The commands: what `estlora generate`, `grid`, `eval`, `demo` and `plan` do, each over one `Session`
or the plan alone. The command line and the web UI are shells over these."""
