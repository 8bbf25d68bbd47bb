"""The method registry loads the built-in methods once, and a caller that comes while another
thread is loading them waits for all of them (the server asks from several threads as it
starts: its first /v1/methods once listed only the methods imported so far)."""
from __future__ import annotations

import json
import subprocess
import sys

PROBE = """
import json, threading
from analogon import methods
seen, start = [], threading.Barrier(4)
def ask():
    start.wait()
    seen.append(sorted(m.id for m in methods.all_methods()))
threads = [threading.Thread(target=ask) for _ in range(4)]
[t.start() for t in threads]
[t.join() for t in threads]
print(json.dumps(seen))
"""


def test_concurrent_first_callers_all_see_every_builtin_method():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300)
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    expected = sorted(("pixels", "appearance", "dia", "difference"))
    assert seen == [expected] * 4, out.stderr[-2000:]
