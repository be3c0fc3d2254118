"""A recipe from Python: the same as ``kvplus eval RECIPE --out DIR``, in a few lines over ``hf_kvplus.eval``.

    PYTHONPATH=. python recipes/run.py recipes/default.yaml runs/default
"""

import sys

from hf_kvplus.eval import load_recipe, markdown_table, run_recipe

recipe = load_recipe(sys.argv[1] if len(sys.argv) > 1 else "default")
result = run_recipe(recipe, out=sys.argv[2] if len(sys.argv) > 2 else None)
rows = [r for r in result["rows"] if r["status"] == "ok"]
print(markdown_table(rows, ["experiment", "strategy", "settings", "ppl", "cache_mib", "memory_saved"]))
print(f"run folder: {result['folder']} (results.csv, results.jsonl, summary.md, pareto.png)")
