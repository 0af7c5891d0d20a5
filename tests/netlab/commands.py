"""Run host tools (ip, iptables-restore, nft, ...) with a timeout and a readable error."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence

DEFAULT_COMMAND_TIMEOUT_S = 15.0


class CommandError(RuntimeError):
    """A command exited non-zero; carries its argv, exit code and output."""

    def __init__(self, argv: Sequence[str], returncode: int, stdout: str, stderr: str) -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        super().__init__(
            f"command {' '.join(self.argv)!r} exited {returncode}: "
            f"{stderr.strip() or stdout.strip()}"
        )


def run_command(
    argv: Sequence[str],
    *,
    timeout: float = DEFAULT_COMMAND_TIMEOUT_S,
    input_text: str | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run argv to completion (killed after `timeout` s); CommandError if `check` and rc != 0."""
    completed = subprocess.run(
        list(argv),
        input=input_text,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        stdin=None if input_text is not None else subprocess.DEVNULL,
    )
    if check and completed.returncode != 0:
        raise CommandError(argv, completed.returncode, completed.stdout, completed.stderr)
    return completed
