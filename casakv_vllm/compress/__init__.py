"""KV-cache compression that returns memory: the rule scheduler and worker share, and the compaction."""
