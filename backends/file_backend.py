"""The embedded default store: one directory per environment on local disk.

    FILE_DATA_PATH/<environment>/terraform.tfstate     the state, as received
    FILE_DATA_PATH/<environment>/lock.json             the lock, while held
    FILE_DATA_PATH/<environment>/.flock                empty: see below
    FILE_DATA_PATH/<environment>/history/<N>.tfstate   version N of the state
    FILE_DATA_PATH/<environment>/history/<N>.json      its metadata (serial,
                                                       lineage, size, sha256,
                                                       created, lock_id, who)

Every change is atomic and durable before the server answers (see
`tylstore.write_file_durably`), and taking the lock is an exclusive create,
so two server processes sharing FILE_DATA_PATH exclude each other.  Each
change of the lock, and each state write from its check of the lock to its
last fsync, holds an flock on the environment's empty .flock file: a write whose
lock another process released or took since its server checked it stores
nothing (tylstore.LockChanged).
Directories are 0700 and files 0600: state holds secrets.

Every state stored is also version N, numbered from 1 up, and the state
bytes are written once: the temporary file written and fsynced is
hard-linked into history/ and then renamed over terraform.tfstate, so the
newest version and the state are one inode.  A version is its .json and
its .tfstate together; the .json is created first, exclusively, which
claims the number.  The versions beyond HISTORY_KEEP, and those older than
HISTORY_KEEP_DAYS but the newest, are unlinked in the same write.  Deleting
the state keeps its history, so a deleted state can be restored.

A durable change costs one journal commit, two for a state write, because
the fsyncs come in this order: every name is created, linked, renamed or
unlinked first, then one file is fsynced (which commits all those, on the
journaling file systems), then the directories are fsynced, as POSIX
requires, and find nothing left to commit.  A state's bytes are fsynced
before any name points at them, so a crash never leaves a torn state; it
can leave an empty file under a name just created (a lock, a version's
.json) when the crash came before that change was acknowledged.  Such a
file counts as absent: an empty lock.json is no lock, and is removed by the
next LOCK once it is old enough not to be a lock being written; a version
whose .json is empty is not listed.  A crash can also leave the temporary
file of a state being written: each instance removes those of its
environment on its first state write, once they are STALE_FILE_AGE old.
A change that fails (a full disk, a file in the way) removes the files it
created before its error reaches the server.
"""

import contextlib
import errno
import fcntl
import json
import os
import re
import stat
import time
import uuid

from tylstore import (ENVIRONMENT_NAME, TEMPORARY_PREFIX, BackendUnavailable, LockChanged,
                      TYLPersistent, fsync_path, history_cutoff, lock_id, read_all, write_all,
                      write_temporary_file)

# A version's number as it names its files: no sign, no leading zero, so
# one number has one name.
VERSION_NUMBER = re.compile(r'[1-9][0-9]{0,17}')
VERSION_METADATA = re.compile(r'([1-9][0-9]{0,17})\.json')

# Numbers tried after the next one is found taken by another process.
CLAIM_ATTEMPTS = 100

# Seconds after which an empty lock.json is what a crash left of a LOCK,
# never answered, rather than a lock whose bytes are being written.
EMPTY_LOCK_AGE = 10

# Seconds a change waits for another process's flock on the environment.
FLOCK_WAIT = 5

# Seconds after which a temporary file is what a crash left rather than a
# change under way, which keeps its file for the seconds a write takes.
STALE_FILE_AGE = 3600


class FileBackend(TYLPersistent):
    RAW_BYTES = True

    def __init__(self, environment, constants, **kwargs):
        self.environment = environment
        self.root = constants.FILE_DATA_PATH
        self.directory = os.path.join(self.root, environment)
        self.state_path = os.path.join(self.directory, constants.TFSTATE_FILE_NAME)
        self.lock_path = os.path.join(self.directory, 'lock.json')
        self.flock_path = os.path.join(self.directory, '.flock')
        self.history = os.path.join(self.directory, 'history')
        self.constants = constants
        # The newest version this instance stored (see _known_versions).
        self._newest = None
        # Directories with an entry not yet fsynced (see _in_directory).
        self._unsynced = set()
        self._crash_leftovers_removed = False
        # Until when a change fails at once rather than wait for the flock
        # (see _wait_for_flock).
        self._flock_stalled_until = 0.0

    def _in_directory(self, write, path, data):
        """Run `write(path, data)`, creating the environment's directories
        when missing: on the first change, never on a read, so a mistyped
        name leaves nothing behind, and without a check on every write.
        Their parents are fsynced by the _sync_directories that ends the
        change, where it costs nothing more."""
        try:
            return write(path, data)
        except FileNotFoundError:
            self._make_directories()
            return write(path, data)

    def _make_directories(self):
        os.makedirs(self.root, mode=0o700, exist_ok=True)
        for directory, parent in ((self.directory, self.root), (self.history, self.directory)):
            try:
                os.mkdir(directory, 0o700)
            except FileExistsError:
                continue
            self._unsynced.add(parent)

    @contextlib.contextmanager
    def _exclusive(self, create=True):
        """Hold the flock of the environment's .flock file for the block
        (see the module's docstring); yield False, holding nothing, when
        the environment's directory does not exist and `create` is false.
        A file, not the directory, since NFS takes an exclusive flock only
        on a file open for writing."""
        fd = self._open_flock(create)
        if fd is None:
            yield False
            return
        try:
            self._wait_for_flock(fd)
            yield True
        finally:
            os.close(fd)

    def _open_flock(self, create):
        """The .flock file, open; None when the environment's directory does
        not exist and `create` is false.  Made when missing (an environment
        stored by an older TYL has none) with the directory's owner, so
        that an admin command run as root leaves no file that the service's
        user cannot open."""
        try:
            return os.open(self.flock_path, os.O_RDWR)
        except FileNotFoundError:
            pass
        if not os.path.isdir(self.directory):
            if not create:
                return None
            self._make_directories()
        try:
            fd = os.open(self.flock_path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:     # made meanwhile by another process
            return os.open(self.flock_path, os.O_RDWR)
        owner = os.stat(self.directory)
        if os.geteuid() == 0 and owner.st_uid != 0:
            os.fchown(fd, owner.st_uid, owner.st_gid)
        return fd

    def _wait_for_flock(self, fd):
        """Take the flock, waiting FLOCK_WAIT seconds at most for another
        process's change: past that, BackendUnavailable (a 503, which
        Terraform retries) rather than a request that hangs, holding the
        environment's mutex, behind a stopped or stalled process.  For
        FLOCK_WAIT after such a wait, changes try once and fail at once, so
        that requests queued behind the first do not wait in turn."""
        now, pause = time.monotonic(), 0.001
        deadline = now if now < self._flock_stalled_until else now + FLOCK_WAIT
        while True:
            try:
                return fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    self._flock_stalled_until = time.monotonic() + FLOCK_WAIT
                    raise BackendUnavailable('env %s: another process has held %s for %g s'
                                             % (self.environment, self.flock_path, FLOCK_WAIT))
                time.sleep(pause)
                pause = min(pause * 2, 0.05)

    def _sync_directories(self, *directories):
        """fsync `directories`, and those where a directory was created, as
        the last step of a change (see the module's docstring)."""
        for directory in self._unsynced.union(directories):
            fsync_path(directory)
        self._unsynced.clear()

    # Every file goes through these two, `role` naming it ('state', 'lock'
    # or 'version': a version's metadata), so a subclass can store another
    # form of the same bytes (aes_backend encrypts them) and reuse all the
    # rest.
    def _dump(self, role, data):
        """The bytes to write for `data`."""
        return data

    def _load(self, role, path):
        """The data in the file `path`, b'' when it does not exist."""
        return _read(path)

    def set_locked(self, state_obj, **kwargs):
        data = self._dump('lock', kwargs['raw_bytes'])
        with self._exclusive():
            created = _create_new(self.lock_path, data)
            if created is None and self._remove_empty_lock():
                created = _create_new(self.lock_path, data)
            if created is None:
                return False
            _fsync_new(created, self.lock_path)
            self._sync_directories(self.directory)
            return True

    def set_unlocked(self, state_obj, **kwargs):
        """Remove the lock; with an ID in `state_obj`, only that holder's."""
        wanted = state_obj.get('ID')
        with self._exclusive(create=False) as held:
            if not held or wanted and lock_id(self._load('lock', self.lock_path)) != wanted:
                return False
            return self._remove_if(
                self.lock_path, lambda path: not wanted or lock_id(self._load('lock', path)) == wanted)

    def _remove_empty_lock(self):
        """Remove lock.json if it is empty and old: see the module's docstring."""
        try:
            if not _is_old_and_empty(self.lock_path):
                return False
        except FileNotFoundError:
            return True
        # Checked again once moved aside: another LOCK may have removed it and
        # created its own meanwhile, empty until written.
        return self._remove_if(self.lock_path, _is_old_and_empty)

    def _remove_if(self, path, wanted):
        """Remove the file `path` if `wanted(moved)` says so of the file,
        moved first to the path `moved`; return whether it was removed.

        The file is renamed to a name of our own before it is checked, so
        a file that another process puts at `path` meanwhile is never the
        one removed; it is put back if it changed since it was last seen.
        """
        claimed = '%s.%s.releasing' % (path, uuid.uuid4().hex)
        try:
            os.rename(path, claimed)
        except FileNotFoundError:
            return False
        doomed = False
        try:
            doomed = wanted(claimed)
        finally:
            if not doomed:
                _put_back(claimed, path)
        if not doomed:
            return False
        os.unlink(claimed)
        fsync_path(self.directory)
        return True

    def get_lock_state(self):
        return self._load('lock', self.lock_path).decode('utf-8')

    def store_tfstate(self, tfstate_obj, **kwargs):
        if not self._crash_leftovers_removed:
            self._remove_crash_leftovers()
        data = self._dump('state', kwargs['raw_bytes'])
        written = self._in_directory(write_temporary_file, self.directory, data)
        try:
            with self._exclusive():
                self._check_holder(kwargs.get('holder_id'))
                if not self.constants.HISTORY_KEEP:
                    os.replace(written, self.state_path)
                    self._sync_directories(self.directory)
                    return None
                return self._store_version(written, kwargs['metadata'])
        except BaseException:
            with contextlib.suppress(FileNotFoundError):   # not renamed into place
                os.unlink(written)
            raise

    def _check_holder(self, holder_id):
        """Raise LockChanged unless the lock is still the one the server saw
        (`holder_id`, '' for none; None when the caller checked nothing)."""
        if holder_id is not None and lock_id(self._load('lock', self.lock_path)) != holder_id:
            raise LockChanged(self.environment)

    def _store_version(self, written, metadata):
        """Make the fsynced file `written` the state and its newest version;
        return the os.stat of the version (see open_tfstate's contract)."""
        description = None
        try:
            known = self._known_versions()
            first = max(known, default=0) + 1
            number, description = self._add_version(written, metadata, first)
            os.replace(written, self.state_path)
        except BaseException:
            if description is not None:  # a version of a state never stored
                os.close(description)
                self._unlink_version(number)
            raise
        if number != first:  # another process wrote meanwhile
            known = [claimed for claimed in self._claimed(self._history_names()) if claimed < number]
        try:
            self._prune(known + [number])
            os.fsync(description)
        finally:
            os.close(description)
        self._sync_directories(self.history, self.directory)
        self._newest = number
        try:  # this version's name is ours alone: see open_tfstate's contract
            return os.stat(self._version_path(number, '.tfstate'))
        except FileNotFoundError:  # pruned already by another process
            return None

    def _remove_crash_leftovers(self):
        """Unlink the temporary files, STALE_FILE_AGE old, that a crash
        left in the environment's directory (see the module's docstring).
        Once per instance: a restarted server cleans up where it writes,
        for one listing."""
        self._crash_leftovers_removed = True
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return
        cutoff = time.time() - STALE_FILE_AGE
        for name in names:
            if name.startswith(TEMPORARY_PREFIX):
                path = os.path.join(self.directory, name)
                try:
                    if os.stat(path).st_mtime < cutoff:
                        os.unlink(path)
                except FileNotFoundError:
                    pass    # removed meanwhile by another process

    def get_tfstate(self):
        return self._load('state', self.state_path)

    def open_tfstate(self):
        try:
            return open(self.state_path, 'rb', buffering=0)
        except FileNotFoundError:
            return None

    def list_versions(self):
        versions = []
        for number in reversed(self._versions()):
            path = self._version_path(number, '.json')
            metadata = self._load('version', path)
            if metadata:  # else pruned meanwhile, or left empty by a crash
                try:
                    versions.append(dict(json.loads(metadata), version=str(number)))
                except (TypeError, ValueError) as error:  # edited by hand
                    raise ValueError('%s: %s' % (path, error)) from None
        return versions

    def get_version(self, version):
        if not VERSION_NUMBER.fullmatch(version) or \
                not os.path.exists(self._version_path(version, '.json')):
            return None
        return self._load('state', self._version_path(version, '.tfstate')) or None

    @classmethod
    def list_environments(cls, constants):
        """The environments holding a state, a lock or a version: not one
        only locked and unlocked, as a mistyped name in a backend block is."""
        try:
            names = os.listdir(constants.FILE_DATA_PATH)
        except FileNotFoundError:
            return []
        return sorted(name for name in names if ENVIRONMENT_NAME.fullmatch(name)
                      and cls._holds_anything(os.path.join(constants.FILE_DATA_PATH, name), constants))

    @staticmethod
    def _holds_anything(directory, constants):
        try:
            names = os.listdir(directory)
        except (FileNotFoundError, NotADirectoryError):
            return False
        if constants.TFSTATE_FILE_NAME in names or 'lock.json' in names:
            return True
        try:
            return any(map(VERSION_METADATA.fullmatch, os.listdir(os.path.join(directory, 'history'))))
        except FileNotFoundError:
            return False

    def delete_tfstate(self, **kwargs):
        with self._exclusive(create=False) as held:
            if not held:
                return
            self._check_holder(kwargs.get('holder_id'))
            try:
                os.unlink(self.state_path)
            except FileNotFoundError:
                return
            fsync_path(self.directory)

    def backend_status(self):
        return {
            'directory': self.directory,
            'locked': os.path.exists(self.lock_path),
            'state_bytes': len(_read(self.state_path)),
            'versions': len(self._versions()),
        }

    # -- history -------------------------------------------------------------

    def _version_path(self, number, suffix):
        return os.path.join(self.history, '%s%s' % (number, suffix))

    def _history_names(self):
        try:
            return set(os.listdir(self.history))
        except FileNotFoundError:
            return set()

    def _claimed(self, names):
        """The version numbers claimed in `names` (a listing of history/), ascending."""
        return sorted(int(found.group(1)) for found in map(VERSION_METADATA.fullmatch, names)
                      if found)

    def _known_versions(self):
        """The numbers of the versions in history/, ascending: listed, or
        taken to be the HISTORY_KEEP up to the newest this instance stored
        while that one's .json is still there (then no process can have
        pruned past it, nor claimed the number above it, without the
        exclusive create in _add_version failing, which lists again).  A
        listing costs more than the rest of the write with hundreds of
        versions; the numbers taken are only ever unlinked, if they exist.
        """
        newest, keep = self._newest, self.constants.HISTORY_KEEP
        if newest and not history_cutoff(self.constants) and \
                os.path.exists(self._version_path(newest, '.json')):
            return list(range(max(newest - keep + 1, 1), newest + 1))
        return self._claimed(self._history_names())

    def _versions(self):
        """The numbers of the complete versions, ascending."""
        names = self._history_names()
        return [number for number in self._claimed(names) if '%d.tfstate' % number in names]

    def _add_version(self, state_file, metadata, first):
        """Link `state_file` into history/ as version `first`, or above the
        newest there when another process took it, beside its metadata; return its number and the
        metadata file's descriptor, open and not yet fsynced.

        The metadata file is created exclusively, which claims the number:
        two processes writing at once take different numbers.
        """
        description = self._dump('version', json.dumps(metadata).encode('utf-8'))
        number = first
        for _ in range(CLAIM_ATTEMPTS):
            created = self._in_directory(_create_new, self._version_path(number, '.json'), description)
            if created is not None:
                try:
                    os.link(state_file, self._version_path(number, '.tfstate'))
                except BaseException:
                    _discard(created, self._version_path(number, '.json'))
                    raise
                return number, created
            number = max(self._claimed(self._history_names()) + [number]) + 1
        raise RuntimeError('no free version number in %s after %d attempts'
                           % (self.history, CLAIM_ATTEMPTS))

    def _prune(self, numbers):
        """Unlink the versions, of `numbers` (ascending), that HISTORY_KEEP
        or HISTORY_KEEP_DAYS let go; the .tfstate first, so that a crash
        leaves at worst a .json, which a later write removes, never a
        .tfstate that nothing lists or removes."""
        keep = self.constants.HISTORY_KEEP
        doomed = numbers[:-keep]
        cutoff = history_cutoff(self.constants)
        if cutoff:
            for number in numbers[-keep:-1]:
                if self._is_complete(number) and not self._created_before(number, cutoff):
                    break
                doomed.append(number)  # too old, or what a crash left of a version
        for number in doomed:
            self._unlink_version(number)

    def _unlink_version(self, number):
        """Unlink version `number`: the .tfstate first (see _prune)."""
        for suffix in ('.tfstate', '.json'):
            try:
                os.unlink(self._version_path(number, suffix))
            except FileNotFoundError:
                pass

    def _is_complete(self, number):
        return os.path.exists(self._version_path(number, '.tfstate'))

    def _created_before(self, number, cutoff):
        metadata = json.loads(self._load('version', self._version_path(number, '.json')) or b'{}')
        return isinstance(metadata.get('created'), str) and metadata['created'] < cutoff


def _create_new(path, data):
    """Create the file `path` holding `data`; return its descriptor, open,
    not yet fsynced, or None when `path` exists."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return None
    try:
        write_all(fd, data)
    except BaseException:
        _discard(fd, path)
        raise
    return fd


def _fsync_new(fd, path):
    """fsync and close `fd`, the file `path` that _create_new made;
    removed if that fails, so a failed change leaves no file behind."""
    try:
        os.fsync(fd)
    except BaseException:
        os.unlink(path)
        raise
    finally:
        os.close(fd)


def _discard(fd, path):
    """Close `fd` and remove `path`, the file that _create_new made."""
    os.close(fd)
    os.unlink(path)


def _is_old_and_empty(path):
    """Whether the file `path` is empty and older than EMPTY_LOCK_AGE."""
    found = os.lstat(path)
    if not stat.S_ISREG(found.st_mode):
        raise OSError(errno.EINVAL, 'not a regular file: move it away by hand', path)
    return not found.st_size and time.time() - found.st_mtime >= EMPTY_LOCK_AGE


def _put_back(moved, path):
    """Move the file `moved` back to `path`, unless another file has taken
    that name meanwhile: the newer one stays."""
    try:
        os.link(moved, path)
    except FileExistsError:
        pass
    os.unlink(moved)


def _read(path):
    """The file's bytes, or b'' when it does not exist."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return b''
    try:
        return read_all(fd)
    finally:
        os.close(fd)
