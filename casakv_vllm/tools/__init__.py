"""Tools around the runtime: the casakv CLI, demo, serving helper, benchmarks, quality suite."""
