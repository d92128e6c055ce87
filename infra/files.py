"""
How prift touches files, in one place: the one way to read a file it did not write, the one way to
write a file, the one way to append to one, and the one check that an output is none of the inputs.

Reading (open_input, read_bytes, read_text): a checkpoint, a run directory or the cache comes from
elsewhere, so a file there must be a regular file (not a FIFO, which would block the reader
forever, nor a device such as /dev/zero, which never ends), inside its directory (a link to
/proc/self/environ would leak the environment into what prift writes; the Hugging Face cache's
snapshot links into its ../../blobs are inside), opened without blocking (O_NONBLOCK, then fstat),
and of a size that fits its kind.

Writing (write_with, write_bytes, write_text, write_json): a temporary file beside the target,
created exclusively without following a link (O_CREAT | O_EXCL | O_NOFOLLOW), flushed to the disk
(fsync), then renamed over the target. A kill leaves the previous file whole, a link in the target's
place is replaced rather than written through, and so is a file with other hard links (its other
names keep their content). A full disk is one line, and the previous file stays.

Appending (append_line): O_APPEND | O_NOFOLLOW on a regular file with no other hard link; a write
the disk has no room for is undone, so the file ends at a whole line.

Outputs are never inputs (overlap): --out may not be, contain or lie inside an input.
"""

import errno
import fcntl
import hashlib
import json
import math
import os
import re
import shutil
import stat
import tempfile
from pathlib import Path

import data

MIB = 2**20
# The most a file of each kind can hold: far above any real one, far below a memory or a disk
JSON_LIMIT = 64 * MIB  # config.json, tokenizer_config.json (with its chat template), args.json, ...
TOKENIZER_LIMIT = 1024 * MIB  # tokenizer.json, vocab.json, merges.txt: large vocabularies
RUN_LIMIT = 1024 * MIB  # metrics.jsonl, eval.json: a long run's log
TEMPORARY_NAME = re.compile(r"(.+)\.\d+\.tmp")  # what write_with creates beside its target


def first_line(e, limit=200):
    """The first line of an exception's message (a library's may be long, or empty)."""
    return (str(e).splitlines() or [type(e).__name__])[0][:limit]


class CheckpointError(Exception):
    """A checkpoint, run directory or file that cannot be used as it is; the message says what to
    fix."""


DataError = data.DataError  # data that cannot be used as it is: the core's own error


# --------------------------------------------------------------------------------------------------
# Reading what prift did not write


def inside(path, root):
    """Whether path, links followed, lies inside the directory root (links followed), or, for a
    Hugging Face cache snapshot (REPO/snapshots/REVISION), inside REPO/blobs where its links go."""
    real, top = os.path.realpath(path), os.path.realpath(root)
    if real == top or real.startswith(top.rstrip("/") + "/"):
        return True
    parts = Path(os.path.abspath(root)).parts
    if "snapshots" in parts[:-1]:
        repo = Path(*parts[: len(parts) - 1 - parts[::-1].index("snapshots")])
        blobs = os.path.realpath(repo / "blobs")
        return real.startswith(blobs + "/")
    return False


def open_input(path, root=None, limit=None, what="file"):
    """path opened for reading (binary), after the checks above: a regular file, inside root when
    given, at most limit bytes when given. Anything else is a CheckpointError naming it."""
    path = Path(path)
    if root is not None and not inside(path, root):
        raise CheckpointError(
            f"{what} {path} is not inside {root} (it leads to {os.path.realpath(path)}); prift "
            "reads a checkpoint's or a run's files only from its own directory"
        )
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise CheckpointError(f"{what} {path} cannot be read ({e.strerror})")
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        kind = (
            "a FIFO"
            if stat.S_ISFIFO(st.st_mode)
            else "a device"
            if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)
            else "a directory"
            if stat.S_ISDIR(st.st_mode)
            else "not a regular file"
        )
        raise CheckpointError(f"{what} {path} is {kind}, not a regular file; replace it")
    if limit is not None and st.st_size > limit:
        os.close(fd)
        raise CheckpointError(
            f"{what} {path} holds {st.st_size} bytes, more than the {limit // MIB} MiB such a file "
            "can be; it is not what it says it is"
        )
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def read_bytes(path, root=None, limit=JSON_LIMIT, what="file"):
    """The bytes of a file that passes open_input's checks; never more than limit (a file of the
    kernel's, such as /proc's, says its size is 0)."""
    with open_input(path, root, limit, what) as f:
        content = f.read() if limit is None else f.read(limit + 1)
    if limit is not None and len(content) > limit:
        raise CheckpointError(f"{what} {path} holds more than {limit // MIB} MiB; replace it")
    return content


def read_text(path, root=None, limit=JSON_LIMIT, what="file", errors="strict"):
    try:
        return read_bytes(path, root, limit, what).decode("utf-8", errors)
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{what} {path} is not UTF-8 text ({e.reason} at byte {e.start})")


def read_json(path, root=None, limit=JSON_LIMIT, what="file"):
    """A JSON file: its value, or a CheckpointError naming it."""
    try:
        return json.loads(read_text(path, root, limit, what))
    except (ValueError, RecursionError) as e:
        raise CheckpointError(f"{what} {path} is not valid JSON ({str(e).split(';')[0][:200]})")


def jsonl_rows(path, limit, what="file", too_long=""):
    """(where, value) of each non-blank line of a JSONL file, where "path:n": read as open_input
    reads, split at \n only (str.splitlines would also cut at U+2028, U+0085 and others, which JSON
    strings may hold), and a line of more than `limit` bytes refused, before it is read whole."""
    with open_input(path, what=what) as f:
        for n, line in enumerate(iter(lambda: f.readline(limit + 1), b""), 1):
            where, line = f"{path}:{n}", line.removesuffix(b"\n")
            if len(line) > limit:
                raise DataError(f"{where}: a line of more than {limit / MIB:.0f} MiB{too_long}")
            try:  # a byte-order mark may open the file
                text = line.decode("utf-8-sig" if n == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise DataError(
                    f"{where}: not UTF-8 text ({e.reason} at byte {e.start} of the line)"
                )
            if text.strip():
                yield where, parse_json(text, where)


def read_jsonl(path, parse, max_len=None):
    """A JSONL data file's examples, each line parsed by parse(value, where) into its shape (a
    DataError names the line). A line longer than line_limit(max_len) bytes is refused before it is
    read whole: at most max_len tokens of it are used, and tokenising all of it would take memory in
    proportion to its length, not to max_len."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    too_long = (
        f", of which --max-len {max_len} tokens at most would be used; shorten or remove "
        "it (or raise --max-len)"
    )
    rows = [
        parse(value, where)
        for where, value in jsonl_rows(path, line_limit(max_len), "data file", too_long)
    ]
    if not rows:
        raise DataError(f"data file {path} holds no examples")
    return rows


def line_limit(max_len):
    """The longest line read, in bytes: 256 per token of max_len, at least 1 MiB (64 MiB when
    max_len is not known). A real example this long would be cut to under 1/64 of itself, even at 4
    bytes a token."""
    return max(2**20, 256 * max_len) if max_len else 2**26


def parse_json(text, where):
    """text's JSON value. JSON that Python's parser rejects, however it rejects it, is one
    DataError naming where."""
    try:
        value = json.loads(text)
        if "\\u" in text:  # a \ud800 escape without its pair decodes to a lone surrogate: not text
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        return value
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: not valid JSON ({e.msg})")
    except RecursionError:
        raise DataError(f"{where}: JSON nested too deeply to read")
    except UnicodeEncodeError:
        raise DataError(
            f"{where}: a \\u escape of half a surrogate pair (\\ud800-\\udfff alone), which is "
            "not text"
        )
    except ValueError as e:  # an integer of thousands of digits: Python's limit on converting them
        raise DataError(f"{where}: a number too long to read ({str(e).split(';')[0]})")


# Content hashes: each file's sha256, streamed, once per file and run (the same inode, size and
# modification time in this process); a new run forgets them (forget_hashes).
_HASHES = {}


def sha256(path, root=None, what="file"):
    with open_input(path, root, None, what) as f:
        st = os.fstat(f.fileno())
        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        if key not in _HASHES:
            h = hashlib.sha256()
            while block := f.read(8 * MIB):
                h.update(block)
            _HASHES[key] = h.hexdigest()
    return _HASHES[key]


def forget_hashes():
    _HASHES.clear()


# --------------------------------------------------------------------------------------------------
# Values read, parsed into declared shapes: strictly (field: a value the run needs, or one error
# naming it) or leniently (typed: what a page shows, a value of another type left out)


def field(d, key, kind, low=None, high=None, default=KeyError):
    """d[key] (default when it is absent or null) if it is a `kind` (bool; int, not a bool; float:
    any finite number) in [low, high]; else a CheckpointError naming it."""
    value = d.get(key)
    if value is None:
        if default is KeyError or default is None:
            raise CheckpointError(
                f"lacks the field '{key}'" if default is KeyError else f"has no valid '{key}'"
            )
        return default
    ok = (
        isinstance(value, bool)
        if kind is bool
        else not isinstance(value, bool)
        and (
            isinstance(value, int)
            if kind is int
            else isinstance(value, (int, float)) and math.isfinite(value)
        )
    )
    if ok and kind is not bool and not (low <= value <= (math.inf if high is None else high)):
        ok = False
    if not ok:
        what = {bool: "true or false", int: "an integer", float: "a number"}[kind]
        where = f" in [{low}, {high}]" if kind is not bool else ""
        raise CheckpointError(f"'{key}' is {value!r}; expected {what}{where}")
    return float(value) if kind is float else value


BIG = 10**15  # no count of steps, tokens or seconds is this large


def fits(value, kind):
    """Whether a value read from a file is a `kind`: int (not a bool, not huge), float (any finite
    number), str, list of str, or dict."""
    if kind is int:
        return type(value) is int and abs(value) < BIG
    if kind is float:
        return type(value) in (int, float) and math.isfinite(value) and abs(value) < BIG
    if kind is list:
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    return isinstance(value, kind)


def typed(d, fields):
    """The entries of d that fields names, each of its type (see fits); the others are left out."""
    return {k: d[k] for k, kind in fields.items() if k in d and fits(d[k], kind)}


# --------------------------------------------------------------------------------------------------
# Writing


def temporary(path):
    """The name write_with writes under before renaming: beside the target, of this process."""
    return path.with_name(f"{path.stem}.{os.getpid()}.tmp")


def write_with(path, write, what="file"):
    """Write path whole or not at all: write(f, tmp) fills f, the file object of the temporary
    tmp (a library that writes by name may write tmp itself); then fsync and rename over path."""
    path = Path(path)
    tmp = temporary(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        try:
            fd = os.open(tmp, flags, 0o644)
        except FileExistsError:  # left by a killed process of the same pid: this one is not it
            tmp.unlink()
            fd = os.open(tmp, flags, 0o644)
        with os.fdopen(fd, "wb") as f:
            write(f, tmp)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if not (isinstance(e, OSError) and e.filename == str(tmp) and e.errno == errno.EEXIST):
            with _quiet():
                tmp.unlink()
        if isinstance(e, OSError) or type(e).__name__ == "SafetensorError":
            reason = getattr(e, "strerror", None) or first_line(e)
            raise CheckpointError(
                f"writing {what} {path} failed ({reason})"
                + ("; make room and run again" if getattr(e, "errno", None) == errno.ENOSPC else "")
                + (f"; {path.name} as it was is kept" if os.path.lexists(path) else "")
            ) from None
        raise
    with _quiet():  # the rename itself reaches the disk
        dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


class _quiet:
    def __enter__(self):
        return self

    def __exit__(self, kind, e, tb):
        return kind is not None and issubclass(kind, OSError)


def write_bytes(path, content, what="file"):
    write_with(path, lambda f, tmp: f.write(content), what)


def write_text(path, text, what="file"):
    """text as UTF-8; a path's undecodable bytes (surrogate escapes) are written back as they were,
    any other lone surrogate as U+FFFD, so that a page naming such a path is still written whole."""
    try:
        content = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        content = text.encode("utf-8", "replace")
    write_bytes(path, content, what)


def write_json(path, value, what="file", indent=1):
    write_text(path, json.dumps(value, indent=indent, default=str) + "\n", what)


def copy_file(src, dst, root, limit, what="file"):
    """src (checked as open_input checks it, inside root) copied as bytes into dst (written as
    write_with writes): never a link, never more than limit bytes."""
    with open_input(src, root, limit, what) as f:

        def write(out, tmp):
            left = limit
            while block := f.read(min(8 * MIB, left + 1)):
                left -= len(block)
                if left < 0:
                    raise CheckpointError(f"{what} {src} grew past {limit // MIB} MiB")
                out.write(block)

        write_with(dst, write, what)


def append_line(path, line, what="file"):
    """Append one line to path: never through a link, never to a file with other hard links, never
    blocking; a write the disk has no room for is undone (the file keeps its whole lines)."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as e:
        raise CheckpointError(
            f"{what} {path} cannot be appended to ({e.strerror}"
            + (": it is a symbolic link" if e.errno == errno.ELOOP else "")
            + "); prift appends only to a file it wrote"
        )
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink > 1:
            raise CheckpointError(
                f"{what} {path} is not a regular file of its own (a FIFO, a device or a file with "
                "other hard links); prift appends only to a file it wrote"
            )
        content = memoryview(line.encode())
        try:
            while content:
                content = content[os.write(fd, content) :]
        except OSError as e:
            os.ftruncate(fd, st.st_size)
            raise CheckpointError(
                f"appending to {what} {path} failed ({e.strerror}); it ends at its last whole line"
            ) from None
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------------
# Directories, links, locks, and the files torch and safetensors write


def readable_name(path, what):
    """path, if its name is text: one that is not UTF-8 (surrogate escapes of raw bytes) is written,
    then cannot be read back from args.json. Else a CheckpointError."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        raise CheckpointError(f"{what} {str(path)!r} is not UTF-8 text; give a name that is")
    return path


def make_dir(path, what="directory"):
    """A directory and its parents, never a link in its place."""
    path = Path(path)
    if path.is_symlink():
        raise CheckpointError(
            f"{what} {path} is a symbolic link; prift writes only into directories of its own"
        )
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CheckpointError(f"{what} {path} cannot be made ({e.strerror}); give another")
    return path


def remove(path):
    """Delete a file, a link (never what it points to), a FIFO or a directory prift wrote; nothing
    if it is not there."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()


def take_dir(path, what, inputs=(), foreign=None):
    """The one way an output directory is taken: a name that reads back (UTF-8), none of the inputs
    ((name, path) pairs) nor in or around one, a directory and not a link, made, locked for this
    process, and only then looked into: foreign(path) names what it holds that is not prift's own
    of its kind, which stops here with nothing removed. Returns the path."""
    path = readable_name(Path(path), what)
    if found := overlap(path, inputs):
        raise CheckpointError(overlap_message(what, path, found))
    if path.is_symlink() or (os.path.exists(path) and not path.is_dir()):
        raise CheckpointError(f"{what} {path} is not a directory; give a new or empty directory")
    made, had_lock = not os.path.lexists(path), os.path.lexists(path / ".lock")
    make_dir(path, what)
    lock(path)
    if names := foreign(path) if foreign else []:
        unlock(path)  # and leave the directory as it was found
        if not had_lock:
            remove(path / ".lock")
        if made:
            remove(path)
        more = f" and {len(names) - 3} more" if len(names) > 3 else ""
        raise CheckpointError(
            f"{what} {path} holds what prift did not write ({', '.join(names[:3])}{more}); "
            "nothing is removed: move them away, or give another directory"
        )
    return path


def rename(src, dst):
    """src renamed over dst, atomically (one file system)."""
    os.replace(src, dst)


def publish_link(link, target):
    """The symbolic link `link` -> target (a name beside it), replaced atomically: a reader sees
    the old link or the new one, never none."""
    tmp = link.with_name(link.name + ".tmp")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target)
    os.replace(tmp, link)


_LOCKS = {}  # resolved directory -> the open file descriptor that holds its lock


def lock(out):
    """Hold OUT/.lock until this process ends (or unlock()): one process per run directory. Another
    process gets one line naming the pid that holds it."""
    key = os.path.realpath(out)
    if key in _LOCKS:
        return
    try:
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        fd = os.open(Path(out) / ".lock", flags, 0o644)
    except OSError as e:
        raise CheckpointError(
            f"{out}/.lock cannot be opened ({e.strerror}); remove it if it is not a prift lock file"
        )
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink > 1:  # its pid would be written into another
        os.close(fd)
        raise CheckpointError(
            f"{out}/.lock is not a file of its own (a FIFO, a device, or a file with other hard "
            "links); remove it if it is not a prift lock file"
        )
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.read(fd, 20).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise CheckpointError(
            f"--out {out} is in use by another prift process (pid {holder}); wait for it to end, "
            f"or stop it, or give another --out"
        )
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _LOCKS[key] = fd


def unlock(path=None):
    """Let go of the directory path, or of every directory this process holds (infra.cli.main,
    when it ends)."""
    if path is not None:
        if (fd := _LOCKS.pop(os.path.realpath(path), None)) is not None:
            os.close(fd)
        return
    while _LOCKS:
        os.close(_LOCKS.popitem()[1])


def save_torch(path, obj, what="file"):
    """obj as torch.save writes it, through write_with."""
    import torch

    write_with(path, lambda f, _: torch.save(obj, f), what)


def load_torch(path, root, limit, what="file"):
    """A torch.save file, read as open_input reads, with weights_only=True: tensors and plain
    containers are built, no code a file names is called."""
    import torch

    with open_input(path, root, limit, what) as f:
        return torch.load(f, weights_only=True, map_location="cpu")


def save_tensors(path, tensors, what="file", metadata=None):
    """A safetensors file, through write_with."""
    from safetensors.torch import save_file

    write_with(path, lambda f, tmp: save_file(tensors, tmp, metadata=metadata), what)


def load_tensors(path, root, what="file"):
    """Every tensor of a safetensors file that passes open_input's checks: {name: tensor}."""
    from safetensors.torch import load_file

    open_input(path, root, None, what).close()
    return load_file(path)


# safetensors files: their headers read alone (names, shapes, dtypes: nothing of the tensors), then
# the tensors, one file open at a time
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")  # as safetensors headers name them


def read_headers(files):
    """{tensor name: (its file, a meta tensor of its shape)} from the safetensors headers alone:
    nothing is read.
    """
    import torch
    from safetensors import SafetensorError, safe_open

    for f in files:  # a regular file, opened without blocking: never a FIFO or a device
        open_input(f, None, None, "weights file").close()
    stored = {}
    for f in files:
        try:
            with safe_open(f, framework="pt", device="cpu") as sf:
                for key in sf.keys():
                    part = sf.get_slice(key)
                    if key in stored or part.get_dtype() not in FLOAT_DTYPES:
                        raise CheckpointError(
                            f"tensor {key} in {f} is stored twice, or as {part.get_dtype()} "
                            f"(weights are {', '.join(FLOAT_DTYPES)})"
                        )
                    stored[key] = f, torch.empty(part.get_shape(), device="meta")
        except SafetensorError as e:
            raise CheckpointError(
                f"weights file {f} cannot be read as safetensors ({e}); download it again"
            )
        except (RuntimeError, OSError, MemoryError) as e:  # mapped whole: larger than memory allows
            raise CheckpointError(
                f"weights file {f} cannot be opened ({first_line(e)}): more "
                "than this machine's memory can map"
            ) from None
    return stored


def memory_bytes():
    """The memory this machine has, in bytes (None where it cannot be known)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def read_tensors(files, dtype, device, shapes=None):
    """{name: file} -> {name: tensor} in dtype on device, one file open at a time; a tensor that is
    not finite everywhere is refused. shapes ({name: a meta tensor}): weights that could not fit in
    this machine's memory are refused in one line before any is read (a sparse file's header can
    claim any size)."""
    import torch
    from safetensors import SafetensorError, safe_open

    if shapes and device.type == "cpu" and (total := memory_bytes()):
        need = sum(t.numel() for t in shapes.values()) * torch.empty(0, dtype=dtype).element_size()
        if need > total:
            raise CheckpointError(
                f"the weights of {next(iter(files.values())).parent} take {need / 2**30:.1f} GiB "
                f"as {str(dtype).removeprefix('torch.')}, more than this machine's "
                f"{total / 2**30:.1f} GiB of memory"
            )
    state = {}
    for f in dict.fromkeys(files.values()):
        with safe_open(f, framework="pt", device="cpu") as sf:
            for key in (k for k, g in files.items() if g == f):
                try:
                    state[key] = sf.get_tensor(key).to(device=device, dtype=dtype)
                except (MemoryError, SafetensorError, RuntimeError) as e:
                    raise CheckpointError(
                        f"tensor {key} in {f} cannot be read ({type(e).__name__}: "
                        f"{first_line(e) if str(e) else 'out of memory'})"
                    ) from None
                if not torch.isfinite(state[key]).all():
                    raise CheckpointError(
                        f"tensor {key} in {f} holds NaN or infinite values: this "
                        "checkpoint is damaged "
                        f"(or saved from a diverged run) and cannot be trained"
                    )
    return state


def writable(directory):
    """Whether a file can be created in directory (tried, and removed): known before a long job."""
    try:
        tempfile.TemporaryFile(dir=directory).close()
        return None
    except OSError as e:
        return e.strerror


# --------------------------------------------------------------------------------------------------
# Outputs are never inputs


def overlap(out, inputs, contains=True):
    """The first input that out would write over, as (name, input path, how), or None. inputs:
    (name, path) pairs. out is refused when it is an input, lies inside one (a directory), or, with
    contains, holds one (--overwrite would delete it, and a run's files could replace it). Links are
    followed: the paths compared are where they lead, also each file of an input directory (the
    Hugging Face cache's links into its blobs)."""
    target = os.path.realpath(out)
    under = lambda a, b: a == b or a.startswith(b.rstrip("/") + "/")
    for name, path in inputs:
        if not path:
            continue
        places = [os.path.realpath(path)]
        if os.path.isdir(path):
            with _quiet():
                places += [os.path.realpath(e.path) for e in os.scandir(path)]
        for place in places:
            if place == target:
                return name, path, "is"
            if under(target, place):
                return name, path, "lies inside"
            if contains and under(place, target):
                return name, path, "holds"
    return None


def overlap_message(flag, out, found):
    name, path, how = found
    return (
        f"{flag} {out} {how} the {name} {path}; a run never writes over its inputs: give "
        f"another {flag}"
    )
