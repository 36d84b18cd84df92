"""Run ``mambahome ...`` and kill this process with SIGKILL in the middle of one file write.

Used by tests/test_kill_resume.py: ``python tests/kill_during_write.py PATTERN N -- CLI ARGS``. The N-th
write (1-based) whose target file name matches the glob PATTERN is interrupted after its temporary file
is complete and before it is moved into place, the moment a power cut or an OOM killer does most harm.
PATTERN "never" runs the command unharmed.
"""
from __future__ import annotations

import fnmatch
import os
import signal
import sys
from pathlib import Path

import engine.io
from engine.cli import main

pattern, nth = sys.argv[1], int(sys.argv[2])
cli_args = sys.argv[sys.argv.index("--") + 1:]
real_write_all = engine.io.atomic_write_all
seen = 0


def killing_write_all(writes, **kwargs):
    global seen
    wrapped = []
    for target, write in writes:
        def write_then_maybe_die(tmp, _write=write, _target=target):
            global seen
            _write(tmp)
            if fnmatch.fnmatch(Path(_target).name, pattern):
                seen += 1
                if seen == nth:
                    os.kill(os.getpid(), signal.SIGKILL)
        wrapped.append((target, write_then_maybe_die))
    return real_write_all(wrapped, **kwargs)


engine.io.atomic_write_all = killing_write_all
sys.exit(main(cli_args))
