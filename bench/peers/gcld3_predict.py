"""Run inside the gcld3 peer venv: predict every line of the given files, pinned to one core.

Prints one JSON object: {"predictions": {file: [code, ...]}, "seconds": {file: s},
"groups": {file: {"en"|"multi"|"nolang": n}}} (groups: probability >= 0.5, else nolang).
"""

import json
import os
import sys
import time
from collections import Counter

import gcld3

os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
# The settings LAION used for LAION-5B.
detector = gcld3.NNetLanguageIdentifier(min_num_bytes=0, max_num_bytes=1000)
predictions, seconds, groups = {}, {}, {}
for path in sys.argv[1:]:
    with open(path, encoding="utf-8") as handle:
        lines = [line.strip() for line in handle if line.strip()]
    start = time.process_time()
    results = [detector.FindLanguage(text=line) for line in lines]
    seconds[path] = time.process_time() - start
    predictions[path] = [r.language for r in results]
    groups[path] = dict(Counter("nolang" if r.probability < 0.5 or r.language == "und" else
                                "en" if r.language == "en" else "multi" for r in results))
print(json.dumps({"predictions": predictions, "seconds": seconds, "groups": groups}))
