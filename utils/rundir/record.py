"""A run folder's record, lock and state: what a run is, who writes it now, and how it ended (torch-free).

* **Record** (``recipe.json``): the run's *identity* -- :data:`IDENTITY_FIELDS` (kind, arch, block type,
  dataset and its options, seed) and every recipe field -- plus how it ran (device, world size, command
  line, ...). :func:`make_record` builds it and :func:`write_record` writes it (the one writer);
  :func:`read_record` reads it back (the one reader; a corrupt file is a :class:`RecordError` naming it).
  :func:`record_conflicts` lists the identity fields two records differ in, arch first. ``kind`` is
  ``train`` (a run from a fresh initialisation) or a run *derived* from other weights: ``finetune``
  (``--init-weights``), ``qat``; an export adds its own section to the run's ``summary.json``.
* **Lock** (``.lock``): an exclusive ``fcntl.flock`` held by the one process writing into the folder
  (rank 0 of a multi-process run). The kernel releases it when that process dies, however it dies, so
  a stale lock never blocks; the file holds the holder's pid, host, start time and command, and a
  second writer is refused with them in one line (:class:`RunBusyError`). A reader tells a live run
  from a dead one with :func:`lock_holder` (a non-blocking try). ``flock`` is only as good as the
  filesystem: local filesystems honour it; on NFS (Linux >= 2.6.12 maps it to an NFS byte-range lock)
  and Lustre (only when mounted with ``-o flock``; ``localflock`` locks one node only) it may hold on
  one node only or fail -- then a lock that cannot be taken is reported, not ignored.
* **State** (``run_state.json``, written atomically): ``running`` / ``finished`` / ``interrupted`` /
  ``failed`` with the reason and the last saved epoch. :class:`RunSession` writes it at every exit
  (normal end, Ctrl-C or SIGTERM: interrupted, any exception: failed). A SIGKILL writes nothing: the
  state still says ``running`` but the lock is free, and :func:`read_state` reports it ``interrupted``.
* **Summary** (``summary.json``): :func:`merge_summary` adds a mode's keys (or its section) to what is
  there, under the lock; nothing else rewrites it.
"""
from __future__ import annotations

import dataclasses
import errno
import json
import os
import signal
import socket
import time
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from acnet.fileio import UnwritablePathError, atomic_open
from train_configs import Recipe
from utils.errors import ACNetError, UsageError
from utils.rundir.identity import ExperimentPaths

__all__ = ["KINDS", "DERIVED_KINDS", "IDENTITY_FIELDS", "STATE_FILE", "LOCK_FILE", "RecordError", "RunBusyError",
           "recipe_fields", "make_record", "write_record", "read_record", "record_kind", "identity",
           "differing_fields", "record_conflicts", "describe_conflicts", "lock_holder", "RunLock", "read_state", "write_state",
           "RunSession", "hold_run", "merge_summary", "read_json_object", "remove_stale_temporaries", "move_aside",
           "data_options_from_run", "command_with_run_data", "RUNNING", "FINISHED", "INTERRUPTED", "FAILED"]

#: ``train``: a run from a fresh initialisation; the others are derived from other weights.
KINDS = ("train", "finetune", "qat")
DERIVED_KINDS = ("finetune", "qat")
#: The identity fields besides the recipe's, in the order a refusal names them.
IDENTITY_FIELDS = ("kind", "arch", "block_type", "dataset", "synthetic_num_train", "synthetic_num_val", "seed")
STATE_FILE, LOCK_FILE = "run_state.json", ".lock"
RUNNING, FINISHED, INTERRUPTED, FAILED = "running", "finished", "interrupted", "failed"
_LOCK_WAIT_SECONDS = 1.0  # a reader's momentary shared lock must not refuse a starting run
#: How long a lock whose recorded holder is dead is waited for: the holder's forked children (data loader
#: workers share its open lock file) notice its death and exit within a few seconds.
_DEAD_HOLDER_WAIT_SECONDS = 20.0


class RecordError(ACNetError):
    """A run file that cannot be read (corrupt JSON, not an object): one line naming the file."""


class RunBusyError(UsageError):
    """Another live process holds the run folder's lock: one line naming the holder."""


# ------------------------------------------------------------------------------------------ record
def recipe_fields() -> tuple[str, ...]:
    """The recipe's fields (``train_configs.Recipe``) that decide what is trained; ``dataset`` is an identity field."""
    return tuple(f.name for f in dataclasses.fields(Recipe) if f.name != "dataset")


def make_record(cmd, recipe, kind: str, **extra: Any) -> dict[str, Any]:
    """The record of a run of command ``cmd`` with ``recipe``: identity first, then ``extra`` (how it ran)."""
    if kind not in KINDS:
        raise ValueError(f"unknown run kind {kind!r}; one of {KINDS}")
    return {"kind": kind, "arch": cmd.arch, "block_type": cmd.block_type, **recipe.to_dict(), "dataset": cmd.dataset,
            "seed": cmd.seed, "data_dir": cmd.data.data_dir, "synthetic_num_train": cmd.data.synthetic_num_train,
            "synthetic_num_val": cmd.data.synthetic_num_val, **extra}


def write_record(paths: ExperimentPaths, record: Mapping[str, Any]) -> None:
    """Write ``recipe.json`` atomically (the only writer of a run's record)."""
    _save_json(dict(record), paths.recipe)


def read_json_object(path: Path) -> Optional[dict[str, Any]]:
    """The JSON object in ``path``; ``None`` if the file does not exist; :class:`RecordError` if it is not one."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise RecordError(f"{path} is unreadable ({type(exc).__name__}); fix or remove it") from None
    try:
        content = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RecordError(f"{path} is corrupt (not JSON: {exc.msg} at line {exc.lineno}); fix or remove it, or "
                          "start over with -c restart") from None
    if not isinstance(content, dict):
        raise RecordError(f"{path} is corrupt (not a JSON object); fix or remove it, or start over with -c restart")
    return content


def read_record(paths: ExperimentPaths) -> Optional[dict[str, Any]]:
    """The run's record (``recipe.json``) with its ``kind``; ``None`` when there is none (the one reader)."""
    record = read_json_object(paths.recipe)
    if record is not None:
        record["kind"] = record_kind(record)
    return record


def record_kind(record: Mapping[str, Any]) -> str:
    """``kind`` of a record; records written before it existed: ``qat`` / ``finetune`` / ``train`` from their fields."""
    kind = record.get("kind")
    if kind in KINDS:
        return str(kind)
    if record.get("qat"):
        return "qat"
    return "finetune" if record.get("init_weights") else "train"


def identity(record: Mapping[str, Any]) -> dict[str, Any]:
    """The fields of ``record`` that decide what is trained, in :data:`IDENTITY_FIELDS` then recipe order."""
    return {key: record[key] for key in (*IDENTITY_FIELDS, *recipe_fields()) if key in record}


def _canonical(value: Any) -> Any:
    return json.loads(json.dumps(value))  # tuples as lists, as recipe.json stores them


def differing_fields(recorded: Mapping[str, Any], wanted: Mapping[str, Any]) -> list[str]:
    """The identity fields both records name and differ in, in :data:`IDENTITY_FIELDS` then recipe order."""
    return [key for key in (*IDENTITY_FIELDS, *recipe_fields())
            if key in recorded and key in wanted and _canonical(recorded[key]) != _canonical(wanted[key])]


def record_conflicts(recorded: Mapping[str, Any], wanted: Mapping[str, Any]) -> list[str]:
    """``"field=wanted (run has recorded)"`` for each of :func:`differing_fields`, arch first."""
    return [f"{key}={wanted[key]!r} (run has {recorded[key]!r})" for key in differing_fields(recorded, wanted)]


def describe_conflicts(conflicts: Sequence[str], most: int = 3) -> str:
    """The first ``most`` conflicts, then how many more."""
    text = ", ".join(conflicts[:most])
    return text + (f" and {len(conflicts) - most} more" if len(conflicts) > most else "")


def data_options_from_run(weights: str | os.PathLike) -> Optional[dict[str, Any]]:
    """The dataset and data options recorded by the run whose folder holds ``weights`` (a file or the
    folder itself); ``None`` when it is not a run with a readable record."""
    path = Path(weights)
    folder = path if path.is_dir() else path.parent
    try:
        record = read_record(ExperimentPaths(folder))
    except RecordError:
        return None
    if not record or not record.get("dataset"):
        return None
    return {key: record.get(key) for key in ("dataset", "data_dir", "synthetic_num_train", "synthetic_num_val",
                                            "seed")}


def _given(argv: Sequence[str], option: str, others: Sequence[str] = ()) -> bool:
    """Whether ``option`` (or an abbreviation argparse takes for it) is on the command line ``argv``."""
    for token in argv:
        flag = token.split("=", 1)[0]
        if flag.startswith("--") and len(flag) > 2 and option.startswith(flag) \
                and not any(other.startswith(flag) for other in others):
            return True
    return False


def command_with_run_data(cmd, weights: str | os.PathLike):
    """``cmd`` with the dataset and data options of the run whose folder holds ``weights`` (its record),
    each unless the command line gives it (``--dataset``, ``--data-dir``, ``--synthetic-num-*``, ``--seed``).

    A mode that reads a run (``--eval-only``, ``--export-onnx --quantize``, ``--qat``) so evaluates and
    calibrates on the data the run was trained on, without downloading another dataset.
    """
    recorded = data_options_from_run(weights)
    if recorded is None:
        return cmd
    argv = tuple(cmd.argv)
    changes: dict[str, Any] = {}
    data_changes: dict[str, Any] = {}
    dataset = cmd.dataset
    if not _given(argv, "--dataset", ("--data-dir",)):
        dataset = changes["dataset"] = recorded["dataset"]
    if dataset == recorded["dataset"]:  # the run's data options belong to its dataset
        if not _given(argv, "--data-dir", ("--dataset",)) and recorded.get("data_dir"):
            data_changes["data_dir"] = recorded["data_dir"]
        for option in ("synthetic_num_train", "synthetic_num_val"):
            if not _given(argv, "--" + option.replace("_", "-")) and recorded.get(option) is not None:
                data_changes[option] = recorded[option]
        if not _given(argv, "--seed") and recorded.get("seed") is not None:
            changes["seed"] = int(recorded["seed"])
    if data_changes:
        changes["data"] = dataclasses.replace(cmd.data, **data_changes)
    return dataclasses.replace(cmd, **changes) if changes else cmd


# ------------------------------------------------------------------------------------------ files
def _save_json(obj: Any, path: Path) -> None:
    with atomic_open(path, "w") as fh:
        json.dump(obj, fh, indent=2, sort_keys=False)
        fh.write("\n")


def merge_summary(path: Path, updates: Mapping[str, Any], section: Optional[str] = None) -> dict[str, Any]:
    """Read ``summary.json``, add ``updates`` (at the top level, or under ``section``), write it back atomically.

    Keys of other modes are kept. A corrupt file is a :class:`RecordError` (never silently replaced).
    """
    summary = read_json_object(path) or {}
    if section is None:
        summary.update(updates)
    else:
        inner = summary.get(section)
        summary[section] = {**(inner if isinstance(inner, dict) else {}), **updates}
    _save_json(summary, path)
    return summary


def remove_stale_temporaries(folder: Path) -> list[str]:
    """Remove the ``.*.tmp`` files (atomic writes of a writer that died) and ``.write-test.*`` probes in ``folder``.

    Call it only while holding the folder's lock: no live writer of ours owns them then.
    """
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        name = entry.name
        if name.startswith(".") and (name.endswith(".tmp") or name.startswith(".write-test.")) and entry.is_file():
            try:
                os.remove(entry.path)
                removed.append(name)
            except OSError:
                pass
    return removed


def move_aside(folder: Path) -> Optional[Path]:
    """Move every file of ``folder`` (but its lock and earlier ``previous-*`` folders) into
    ``folder/previous-<YYYYmmdd-HHMMSS>/``; returns that folder (``None``: nothing to move)."""
    entries = [p for p in folder.iterdir() if p.name != LOCK_FILE and not p.name.startswith("previous-")]
    if not entries:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = folder / f"previous-{stamp}"
    suffix = 1
    while target.exists():
        suffix += 1
        target = folder / f"previous-{stamp}-{suffix}"
    target.mkdir()
    for entry in entries:
        os.replace(entry, target / entry.name)
    return target


# ------------------------------------------------------------------------------------------ lock
def _describe_holder(holder: Mapping[str, Any]) -> str:
    if not holder:
        return "another process (it has not recorded itself yet)"
    return (f"pid {holder.get('pid', '?')} on {holder.get('host', '?')} since {holder.get('started', '?')} "
            f"({holder.get('what', 'a run')})")


def _read_holder(path: Path) -> dict[str, Any]:
    try:
        content = json.loads(path.read_text(encoding="utf-8") or "{}")
    except (OSError, ValueError):
        return {}
    return content if isinstance(content, dict) else {}


def _holder_is_dead(holder: Mapping[str, Any]) -> bool:
    """The recorded holder is a process of this host that no longer exists."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return False
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


def lock_holder(folder: Path) -> Optional[dict[str, Any]]:
    """``None`` when no live process holds ``folder``'s lock, else the holder (pid, host, started, what; ``{}``
    if it has not recorded itself yet). A non-blocking shared ``flock``, released at once; a lock still held
    after its recorded holder died (by that process's forked children, for a moment) counts as free."""
    import fcntl

    path = Path(folder) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                holder = _read_holder(path)
                return None if _holder_is_dead(holder) else holder
            return None  # flock unsupported here: cannot tell
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


class RunLock:
    """The exclusive lock on a run folder (module docstring); :meth:`acquire` or :class:`RunBusyError`."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self.fd: Optional[int] = None

    def acquire(self, what: str) -> None:
        import fcntl

        deadline = time.monotonic() + _LOCK_WAIT_SECONDS
        dead_deadline = time.monotonic() + _DEAD_HOLDER_WAIT_SECONDS
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError as exc:
                raise UnwritablePathError(self.path, exc) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise RunBusyError(f"cannot lock {self.folder} ({os.strerror(exc.errno)}): the filesystem does "
                                       "not support flock; use a local --output-dir (see docs/training.md, 'What a run "
                                       "writes')") from None
                holder = _read_holder(self.path)
                if time.monotonic() < deadline or (_holder_is_dead(holder) and time.monotonic() < dead_deadline):
                    time.sleep(0.05)
                    continue
                raise RunBusyError(f"{self.folder} is in use by {_describe_holder(holder)}: wait "
                                   "for it to end, or use another --exp-name") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except OSError:
                same = False
            if not same:  # the file was removed (a refused run's fresh folder) while we waited: retry
                os.close(fd)
                continue
            break
        self.fd = fd
        holder = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": time.strftime("%Y-%m-%d %H:%M:%S"), "what": what}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)

    def release(self, remove: bool = False) -> None:
        if self.fd is None:
            return
        if remove:
            try:
                os.remove(self.path)
            except OSError:
                pass
        else:
            try:
                os.ftruncate(self.fd, 0)
            except OSError:
                pass
        os.close(self.fd)  # releases the flock
        self.fd = None


# ------------------------------------------------------------------------------------------ state
def write_state(paths: ExperimentPaths, state: str, *, kind: str = "train", epoch: Optional[int] = None,
                epochs: Optional[int] = None, reason: Optional[str] = None) -> None:
    """Write ``run_state.json`` atomically."""
    _save_json({"state": state, "reason": reason, "epoch": epoch, "epochs": epochs, "kind": kind,
                "pid": os.getpid(), "host": socket.gethostname(), "updated": time.strftime("%Y-%m-%d %H:%M:%S")},
               paths.root / STATE_FILE)


def read_state(folder: Path) -> Optional[dict[str, Any]]:
    """The run's state as a reader may trust it; ``None`` when the folder has no state file.

    ``running`` only while a live process holds the lock; a ``running`` state whose process is gone
    (SIGKILL, power loss) is reported ``interrupted`` with ``reason`` ``killed``. A corrupt state file is a
    :class:`RecordError`.
    """
    state = read_json_object(Path(folder) / STATE_FILE)
    if state is None:
        return None
    if state.get("state") == RUNNING and lock_holder(Path(folder)) is None:
        state = {**state, "state": INTERRUPTED, "reason": "killed (the process ended without recording why)"}
    return state


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    message = text[0] if text else ""
    if isinstance(exc, ACNetError):
        return message or type(exc).__name__
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


class RunSession:
    """Holds a run folder for one command (module docstring): ``with RunSession(...) as session:``.

    On entry (the main rank): the folder is created if needed, locked (or :class:`RunBusyError`), and
    stale temporary files are removed. :meth:`begin` marks the point after which the run writes: the
    state becomes ``running`` and SIGTERM is handled as Ctrl-C. On exit after :meth:`begin` the state
    records how it ended (``finished``; ``interrupted`` for Ctrl-C / SIGTERM; ``failed`` with the
    exception's one line, also written to ``log.txt`` as an ``ERROR`` line). Exiting before
    :meth:`begin` writes nothing (and removes a folder it created).
    """

    def __init__(self, paths: ExperimentPaths, what: str, *, kind: str = "train", main: bool = True,
                 epochs: Optional[int] = None):
        self.paths = paths
        self.what = what
        self.kind = kind
        self.main = main
        self.epochs = epochs
        self.epoch: Optional[int] = None  # the last saved epoch
        self.run_log = None  # utils.rundir.log.RunLog, once the run writes its log
        self.began = False
        self.lock = RunLock(paths.root)
        self._created: Optional[Path] = None  # the nearest ancestor that existed before
        self._lock_existed = True
        self._previous_sigterm: Any = None

    def __enter__(self) -> "RunSession":
        if self.main:
            self._created = next((p for p in (self.paths.root, *self.paths.root.parents) if p.exists()), None)
            self._lock_existed = self.lock.path.exists()
            try:
                self.paths.root.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise UnwritablePathError(self.paths.root, exc) from None
            try:
                self.lock.acquire(self.what)
            except BaseException:
                self._remove_if_created()
                raise
            remove_stale_temporaries(self.paths.root)
        return self

    def begin(self, run_log=None, epoch: Optional[int] = None) -> None:
        """From now on the run writes: state ``running``; SIGTERM raises ``KeyboardInterrupt``."""
        self.run_log = run_log
        self.epoch = epoch
        self.began = True
        if self.main:
            self._write(RUNNING)
        try:
            self._previous_sigterm = signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
        except ValueError:  # not the main thread
            self._previous_sigterm = None

    def saved(self, epoch: int) -> None:
        """A resumable state of ``epoch`` epochs was saved."""
        self.epoch = epoch
        if self.main and self.began:
            self._write(RUNNING)

    def _write(self, state: str, reason: Optional[str] = None) -> None:
        write_state(self.paths, state, kind=self.kind, epoch=self.epoch, epochs=self.epochs, reason=reason)

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if self.began:
                if self._previous_sigterm is not None:
                    signal.signal(signal.SIGTERM, self._previous_sigterm)
                if self.main:
                    try:
                        self._record_end(exc)
                    except OSError as error:  # e.g. the disk is full: the run's own error is the one to report
                        import logging

                        logging.getLogger("do_acnet").warning("could not record the run's end in %s: %s",
                                                              self.paths.root / STATE_FILE, error)
        finally:
            if self.main:
                if not self.began and not self._lock_existed:
                    self._remove_if_created()  # nothing was written: leave the folder as it was
                else:
                    self.lock.release()

    def _record_end(self, exc: Optional[BaseException]) -> None:
        if exc is None:
            self._write(FINISHED)
            return
        if isinstance(exc, KeyboardInterrupt):
            where = getattr(exc, "where", None)
            reason = f"interrupted {where}" if where else "interrupted"
            self._log_end(reason, "interrupted")
            self._write(INTERRUPTED, reason)
            return
        reason = _one_line(exc)
        self._log_end("ERROR: " + reason, "ERROR")
        self._write(FAILED, reason)

    def _log_end(self, line: str, prefix: str) -> None:
        """The log's last line says how the run ended (unless it already does)."""
        import logging

        log = self.run_log
        if log is None or not getattr(log, "enabled", False):
            return
        last = log.lines[-1].split(" ", 2)[-1] if log.lines else ""
        if last.startswith(prefix):
            return
        try:
            if prefix == "ERROR":
                log._append(line, logging.ERROR)  # may name a 'top1=' value; RunLog.write refuses those
            else:
                log.write(line, logging.WARNING)
        except OSError:
            pass  # e.g. the disk is full: the state file below says it

    def _remove_if_created(self) -> None:
        """Remove the lock file, and the folders this session created if they are empty."""
        self.lock.release(remove=True)
        folder = self.paths.root
        while self._created is not None and folder != self._created and self._created in folder.parents:
            try:
                folder.rmdir()
            except OSError:
                return
            folder = folder.parent


def _sigterm_as_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt("SIGTERM")



class hold_run:
    """``with hold_run(session, ctx):`` -- :class:`RunSession` for every rank of a (multi-process) run: rank 0
    locks; a refusal reaches every rank (each raises it), so no rank waits for a rank that stopped."""

    def __init__(self, session: RunSession, ctx):
        self.session = session
        self.ctx = ctx

    def __enter__(self) -> RunSession:
        error: Optional[BaseException] = None
        try:
            self.session.__enter__()
        except ACNetError as exc:
            error = exc
        if getattr(self.ctx, "distributed", False):
            # torch: only in a distributed run (this module is torch-free: show_log, reproduce --dry-run)
            from utils.engine.distributed import broadcast_object

            message = broadcast_object(None if error is None else str(error))
            if error is None and message is not None:
                raise RunBusyError(message)
        if error is not None:
            raise error
        return self.session

    def __exit__(self, exc_type, exc, tb) -> None:
        self.session.__exit__(exc_type, exc, tb)
