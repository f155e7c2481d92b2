"""
Errors the user can fix (a missing file, a wrong option, bad data, a checkpoint that does not fit): the command
lines print them as one line, `error: ...`, once, without a traceback, and exit with status 2. Any other exception
is a bug and keeps its traceback. ETRIS_DEBUG=1 shows the traceback of user errors too.
"""
import os
import sys


class UserError(Exception):
    """Bad input, with a message that names the thing and says what to do."""


def run_cli(main):
    """Run a command line's main(). Every process of a torchrun job checks the same files and options and meets
    the same UserError, so only the first process (RANK 0) prints it."""
    try:
        main()
    except UserError as e:
        if os.environ.get("ETRIS_DEBUG") == "1":
            raise
        message = str(e)
        if "Original Traceback" in message:  # raised in a DataLoader worker, which sends its traceback along
            message = message.rstrip().splitlines()[-1].split(": ", 1)[-1]
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {message}", file=sys.stderr, flush=True)
        sys.exit(2)
