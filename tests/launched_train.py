"""Run by tests under `accelerate launch` (not a test itself): `train()` for every config in a JSON file,
so that several runs pay the start-up of the processes once.

    {"configs": [TrainConfig as a dict, ...], "kill_at": 5}

With "kill_at", the first process SIGKILLs the launcher's process group after that optimizer step, as
`kill -9` or a job scheduler would, and then carries on: the workers must die with their launcher.
"""

from __future__ import annotations

import json
import os
import signal
import sys


def main(path: str) -> None:
    from students.train import TrainConfig, train

    spec = json.loads(open(path).read())
    kill_at = spec.get("kill_at")

    def on_step_end(step: int) -> None:
        if kill_at is not None and step == kill_at and os.environ.get("RANK", "0") == "0":
            os.killpg(os.getpgid(os.getppid()), signal.SIGKILL)

    for cfg in spec["configs"]:
        train(TrainConfig(**cfg), on_step_end=on_step_end)


if __name__ == "__main__":
    main(sys.argv[1])
