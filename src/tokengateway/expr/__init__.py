"""The expressions of manifests: `cel` (CEL predicates and counter expressions, behind
one small interface so the engine can be swapped) and `kept` (the bounded caches of their
answers)."""
