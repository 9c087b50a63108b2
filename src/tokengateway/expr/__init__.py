"""The small languages of manifests: `cel` (CEL predicates and counter expressions, behind
one small interface so the engine can be swapped), `kept` (the bounded caches of their
answers) and `duration` (Kuadrant windows and Gateway API durations)."""
