"""Which exceptions are the user's mistakes, and the short message the CLI prints for them instead of a traceback.

A user's mistake (a bad config value, missing or broken data, a checkpoint that does not fit) reaches the CLI as an
exception whose message already says what is wrong and what to do: one this project raised on purpose (a ``raise``
statement in the plugin or the zoo, possibly wrapped by jsonargparse or re-raised from a DataLoader worker), one of
Lightning's ``MisconfigurationException``, or any failure while a ``--ckpt_path`` checkpoint is restored. Everything
else is a bug and keeps its traceback. ``LIGHTNING_ADAMW_TRACEBACK=1`` shows the traceback of user errors too.
"""

from __future__ import annotations

import difflib
import linecache
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from lightning.fabric.utilities.exceptions import MisconfigurationException

#: Set to 1 to see the traceback of a user error (for debugging).
TRACEBACK_ENV = "LIGHTNING_ADAMW_TRACEBACK"
TRACEBACK_HINT = f"(set {TRACEBACK_ENV}=1 to see the traceback)"
_WORKER_FRAME = re.compile(r'^  File "(?P<file>.+)", line (?P<line>\d+), in ')
#: The checkpoint key that records which version of lightning_adamw wrote it.
VERSION_KEY = "lightning_adamw_version"


def show_traceback() -> bool:
    return os.environ.get(TRACEBACK_ENV, "").strip().lower() not in ("", "0", "false", "no")


def _chain(err: BaseException) -> Iterator[BaseException]:
    """``err`` and the exceptions it was raised from, outermost first."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)


def _frames(tb: TracebackType | None) -> list[tuple[str, int, str]]:
    """``(file, line, function)`` of each frame of a traceback, outermost first."""
    out = []
    while tb is not None:
        out.append((tb.tb_frame.f_code.co_filename, tb.tb_lineno, tb.tb_frame.f_code.co_name))
        tb = tb.tb_next
    return out


def _is_raise(filename: str, line: int, roots: Sequence[Path]) -> bool:
    """Whether ``filename:line`` is a ``raise`` statement in this project's source."""
    path = Path(filename).resolve()
    return any(path.is_relative_to(root) for root in roots) and linecache.getline(filename, line).lstrip().startswith(
        "raise ")


def _worker_original(err: BaseException) -> tuple[str, str, int] | None:
    """``(message, file, line)`` of the exception a DataLoader worker raised, from torch's re-raised copy."""
    text = str(err)
    if not text.startswith("Caught ") or "\nOriginal Traceback" not in text:
        return None
    lines = text.split("\nOriginal ", 1)[1].splitlines()
    last = max((i for i, line in enumerate(lines) if _WORKER_FRAME.match(line)), default=None)
    if last is None:
        return None
    match = _WORKER_FRAME.match(lines[last])
    rest = lines[last + 1:]
    while rest and rest[0].startswith(" "):  # the frame's source line and its ^^^ markers
        rest = rest[1:]
    message = "\n".join(rest).split(": ", 1)[-1]
    return message, match["file"], int(match["line"])


def project_message(err: BaseException, roots: Sequence[Path]) -> str | None:
    """The message of the user error in ``err``'s chain (the outermost one the project raised), or ``None``."""
    for item in _chain(err):
        if isinstance(item, MisconfigurationException):
            return str(item)
        frames = _frames(item.__traceback__)
        if frames and _is_raise(*frames[-1][:2], roots):
            return str(item)
        original = _worker_original(item)
        if original is not None and _is_raise(original[1], original[2], roots):
            return original[0]
    return None


def _restore_step(err: BaseException) -> str | None:
    """The step of Lightning's checkpoint restore that failed (``resume_start``: reading the file), else ``None``."""
    steps = [function for item in _chain(err) for file, _, function in _frames(item.__traceback__)
             if Path(file).name == "checkpoint_connector.py" and function.startswith(("resume_start", "restore_"))]
    return steps[-1] if steps else None


def _state_dict_summary(text: str) -> str | None:
    """torch's ``Error(s) in loading state_dict`` (one line per key) as counts with a few examples."""
    if "Error(s) in loading state_dict" not in text:
        return None
    parts = []
    for label, pattern in (("missing", r"Missing key\(s\) in state_dict: (.*)"),
                           ("unexpected", r"Unexpected key\(s\) in state_dict: (.*)")):
        found = re.search(pattern, text)
        if found:
            keys = re.findall(r'"([^"]+)"', found.group(1))
            parts.append(f"{len(keys)} {label} weights (e.g. {', '.join(keys[:2])})")
    sizes = re.findall(r"size mismatch for ([^:]+): copying a param with shape (torch.Size\(\[[^\]]*\]\)) from "
                       r"checkpoint, the shape in current model is (torch.Size\(\[[^\]]*\]\))", text)
    if sizes:
        name, saved, current = sizes[0]
        parts.append(f"{len(sizes)} weights of another shape (e.g. {name}: {saved} saved, {current} here)")
    return "its weights belong to another model: " + ", ".join(parts) if parts else None


def _checkpoint_version(path: str) -> str | None:
    """The lightning_adamw version recorded in a readable checkpoint, else ``None``."""
    import torch

    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # unreadable: the restore error says so already
        return None
    return checkpoint.get(VERSION_KEY) if isinstance(checkpoint, dict) else None


def checkpoint_message(err: BaseException, ckpt_path: Any, roots: Sequence[Path], version: str,
                       step: str | None = None) -> str | None:
    """One message for a failure while Lightning restores ``ckpt_path``, naming the file; ``None`` otherwise.

    ``step`` is the restore step that failed (``resume_start``: reading the file); by default it is found in the
    traceback, and a failure outside Lightning's checkpoint restore gives ``None``.
    """
    step = None if ckpt_path is None else step or _restore_step(err)
    if step is None:
        return None
    path = str(ckpt_path)
    own = project_message(err, roots)
    if step == "resume_start" and own is None and Path(path).is_file():
        first = next(iter(str(err).strip().splitlines()), "") or type(err).__name__
        return (f"The checkpoint {path} cannot be read: it is truncated or not a PyTorch checkpoint ({first}). "
                "Use another checkpoint (e.g. an earlier epoch's), or start without --ckpt_path.")
    if step == "resume_start":
        return own or f"The checkpoint {path} cannot be read: {type(err).__name__}: {err}"
    reason = _state_dict_summary(str(err)) or own or f"{type(err).__name__}: {err}"
    saved = _checkpoint_version(path)
    if saved is not None and saved != version:
        origin = f"It was written by lightning_adamw {saved} and this is {version}: resume it with that version."
    elif saved is None and step != "restore_model":
        origin = ("It records no lightning_adamw version: it was written by an older version or outside "
                  "`python -m lightning_adamw`.")
    else:
        origin = "Resume with the config that trained it, or start without --ckpt_path."
    return f"The checkpoint {path} cannot be restored into this run: {reason.rstrip('.')}. {origin}"


# ---------------------------------------------------------------------------------------------- parser errors
_STRUCTURE = ("Does not validate", "Subtypes:", "Given value")


def _summarise_union(message: str) -> str | None:
    """jsonargparse's nested "Does not validate against any of the Union subtypes" as ``key: reason (given: value)``.

    The message nests one ``Parser key "k":`` block per level of the config; the useful lines are the errors at the
    deepest level, less "Expected a <class 'NoneType'>" (every optional value's second alternative).
    """
    if "\n" not in message:
        return None
    lines = message.splitlines()
    keys: list[tuple[int, str]] = []
    found: dict[tuple[str, ...], list[str]] = {}
    given: dict[tuple[str, ...], str] = {}
    for line in lines:
        indent = len(line) - len(line.lstrip())
        text = line.strip().removeprefix("- ")
        if not text:
            continue
        while keys and keys[-1][0] >= indent:
            keys.pop()
        path = tuple(k for _, k in keys)
        key = re.match(r'Parser key "([^"]+)":', text)
        if key:
            keys.append((indent, key.group(1)))
        elif text.startswith("Given value: "):
            given.setdefault(path, text[len("Given value: "):])
        elif not (text.endswith(":") or "NoneType" in text or text.startswith(_STRUCTURE)):
            found.setdefault(path, [])
            if text not in found[path]:
                found[path].append(text)
    if not found:
        return None
    path = max(found, key=len)
    reason = "; ".join(found[path][:3]).replace("typing.", "")
    shown = given.get(path)
    return (f"{'.'.join(path)}: " if path else "") + reason + (f" (given: {shown})" if shown and shown not in reason
                                                             else "")


#: Top-level options LightningCLI offers elsewhere and this CLI leaves out on purpose, with the reason.
REFUSED_OPTIONS = {
    "--lr_scheduler": (
        "--lr_scheduler is not available: the lr (and momentum and decoupled weight decay) schedule is the "
        "OneCycleWD callback's, which refuses a second scheduler. Change its shape with "
        "--trainer.callbacks.schedule (OneCycle, OneCycle2018, OneCycleLM) and its length with --trainer.max_epochs; "
        "to use another torch scheduler, return it from your module's configure_optimizers with DecoupledDecay "
        "instead of OneCycleWD."
    ),
    "--optimizer": (
        "--optimizer is not available: the optimizer is the model's, chosen by name with "
        "--model.init_args.optimizer.name (adam, adamw, sgd, ...) and its settings under --model.init_args.optimizer."
    ),
}


def short_parser_message(message: str, options: Sequence[str]) -> str:
    """A jsonargparse error in one or two lines: the refused option's reason, a "did you mean", or the deepest cause."""
    unrecognized = re.match(r"unrecognized arguments: (.*)", message)
    if unrecognized:
        given = [a.split("=", 1)[0] for a in unrecognized.group(1).split() if a.startswith("--")]
        for arg in given:
            for option, reason in REFUSED_OPTIONS.items():
                if arg == option or arg.startswith(option + "."):
                    return reason
        hints = [f"{arg} (did you mean {close[0]}?)" for arg in given
                 if (close := difflib.get_close_matches(arg, options, n=1, cutoff=0.8))]
        if hints:
            return f"unrecognized arguments: {', '.join(hints)}. Option names must be given in full."
        return message
    return _summarise_union(message) or message


class CheckpointError(RuntimeError):
    """A ``--ckpt_path`` checkpoint that cannot be restored: the message names the file and why."""
