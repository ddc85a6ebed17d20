"""ARM telemetry: opEvents ingest (unary and streamed, deduplicated), query, live tail, stats, run
traces, legacy reference resolution and back-fill, retention, and the COST_TICK budget feed."""
