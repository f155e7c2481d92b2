"""
Errors the user can fix (a missing file, a wrong option, bad data, a checkpoint that does not fit): the command
lines print them as one line, `error: ...`, once, without a traceback, and exit with status 2. Any other exception
is a bug and keeps its traceback. ETRIS_DEBUG=1 shows the traceback of user errors too.
"""
import argparse
import math
import os
import re
import sys


class UserError(Exception):
    """Bad input, with a message that names the thing and says what to do."""


def run_cli(main):
    """Run a command line's main(). Under torchrun each distinct error is printed once: the processes check the
    same files and options and mostly meet the same error, which rank 0 prints; an error of another rank alone
    (a bad sample in its shard) is printed by that rank, named."""
    try:
        main()
    except UserError as e:
        if os.environ.get("ETRIS_DEBUG") == "1":
            raise
        message = str(e)
        if "Original Traceback" in message:  # raised in a DataLoader worker, which sends its traceback along
            message = message.rstrip().splitlines()[-1].split(": ", 1)[-1]
        rank = int(os.environ.get("RANK", "0"))
        if not _printed_by_another_rank(message, rank):
            print(f"error: {message}" if rank == 0 else f"error: rank {rank}: {message}", file=sys.stderr, flush=True)
        sys.exit(2)


RANK0_GRACE_S = 5.0  # how long another rank looks for rank 0 meeting the same error: ranks run the same checks


def _printed_by_another_rank(message, rank):
    """Whether another process of this job prints `message`. The processes claim the message in the job's store:
    the first claim prints. Rank 0 marks that it has the error and claims it at once; another rank first looks
    for rank 0's mark for RANK0_GRACE_S. So an error every rank meets is printed by rank 0, one of rank k alone
    by rank k. Where no store is up (a launcher other than torchrun, before the process group exists) every
    process prints its own."""
    import torch.distributed as dist
    # torchrun's agent serves the store: the variable torch.distributed.rendezvous reads to know it
    store_up = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" or dist.is_initialized()
    if int(os.environ.get("WORLD_SIZE", "1")) == 1 or not store_up:
        return False
    import hashlib
    import time
    from datetime import timedelta
    try:
        store = job_store(timedelta(seconds=30))
        key = f"errors/{hashlib.sha1(message.encode()).hexdigest()}"
        if rank == 0:
            store.set(f"{key}/rank0", "1")
        deadline = time.monotonic() + RANK0_GRACE_S
        while rank != 0 and time.monotonic() < deadline:
            if store.check([f"{key}/rank0"]):
                return True
            time.sleep(0.1)
        return store.add(key, 1) > 1
    except RuntimeError:  # the store went away (torch's DistError): better twice than never
        return False


def job_store(timeout):
    """A client of the key-value store of this torchrun job, or of any job started with MASTER_ADDR/MASTER_PORT
    (env://): torchrun's agent serves it there before the process group exists; without torchrun, rank 0's
    process group does. Keys are set per run attempt (a restarted torchrun job starts afresh). A store
    reached by every process that joined the process group: no second transport, no collective timeout."""
    import torch.distributed as dist
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                          timeout=timeout, wait_for_workers=False)
    return dist.PrefixStore(f"etris/attempt{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


# ----------------------------------------------------------------------------------------------
# command lines

class ArgumentParser(argparse.ArgumentParser):
    """argparse for the command lines: a mistyped option is a UserError (one line naming the option, the value and
    what is allowed), --help shows every default, and a negative number in scientific notation (--lr -1e-4) is
    read as a value, not as an unknown option."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _DefaultsFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        raise UserError(f"{message} (see {self.prog} --help)")

    def parse_known_args(self, args=None, namespace=None):
        args = list(sys.argv[1:] if args is None else args)
        takes_value = {s for a in self._actions if a.nargs is None and a.option_strings for s in a.option_strings}
        glued = []
        for arg in args:  # '--lr', '-1e-4' -> '--lr=-1e-4'; argparse itself only knows '-1' and '-0.5'
            if glued and glued[-1] in takes_value and _NUMBER.fullmatch(arg) and arg.startswith("-"):
                glued[-1] = f"{glued[-1]}={arg}"
            else:
                glued.append(arg)
        return super().parse_known_args(glued, namespace)


_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?|[-+]?(inf|nan)", re.IGNORECASE)


class _DefaultsFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's line breaks; appends '(default: X)' to every option's help that does not say its
    default itself."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (action.default is None or action.default is False or action.default == argparse.SUPPRESS or
                "default" in text or not action.option_strings):
            return text
        default = " ".join(map(str, action.default)) if isinstance(action.default, (list, tuple)) else action.default
        return f"{text} (default: {default})".strip()


def number(kind, low=None, high=None, low_open=False, high_open=False):
    """An argparse type: an int or a finite float (kind) between low and high (low_open / high_open: that bound
    excluded), else an error that says what is allowed: 'argument --batch-size: 0 is not allowed: give an integer
    >= 1'."""
    bounds = (None if low is None else f"{'>' if low_open else '>='} {low}",
              None if high is None else f"{'<' if high_open else '<='} {high}")
    allowed = " and ".join(b for b in bounds if b)
    name = "an integer" if kind is int else "a number"

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {name}: give {name} {allowed}".rstrip()) from None
        if (not math.isfinite(value) or (low is not None and (value < low or (low_open and value == low))) or
                (high is not None and (value > high or (high_open and value == high)))):
            raise argparse.ArgumentTypeError(f"{text} is not allowed: give {name} {allowed}".rstrip())
        return value
    parse.__name__ = kind.__name__  # argparse names the type in some messages
    return parse
