"""PyTerraBackTYL's default store, read and written in place, so a team that
upgrades keeps its states and locks.

    PYSHELVE_DATA_PATH/<environment>PYSHELVE_DB_FILE_NAME   one `shelve` file per environment
        key TFSTATE      the state, as the dict parsed from the JSON received ('' for none)
        key LOCK_STATE   the lock, as the dict parsed from the LockInfo, only while held

Point PYSHELVE_DATA_PATH at PyTerraBackTYL's directory (its default was
/opt/pyterrabacktyl/data), after stopping PyTerraBackTYL: it takes no lock.
The values are pickled objects, not the text received, so this store is not
RAW_BYTES: a state reads back equal as JSON, not byte for byte.

What a "shelve file" is on disk depends on the Python build: `shelve.open`
creates it with the first of dbm.sqlite3 (Python 3.13+), dbm.gnu and
dbm.ndbm that imports, else dbm.dumb, which writes three files: <file>.dat
(the values), <file>.dir (the index) and <file>.bak (the previous index).
Builds without the optional _gdbm and _dbm modules, like the pyenv ones TYL
is tested with, use dbm.dumb.  An existing shelf keeps its own format
(`dbm.whichdb`); one this Python cannot open fails with dbm's error naming
the format (on Debian, python3-gdbm brings dbm.gnu).

No dbm format survives a crash during an update in place (dbm.dumb writes
the values, then rewrites the index unsynced; gdbm and ndbm rewrite pages),
and renaming one new file over the old is atomic only for the single-file
formats.  So every change, under the lock below, writes a whole new shelf
and moves it in like a journal:

1. copy every key of the shelf (values as stored, never unpickled) with the
   change applied into a new shelf of the same format in <file>.tyl-staging/,
   then fsync its files and the directory;
2. rename that directory to <file>.tyl-commit and fsync the data directory:
   the commit point;
3. rename each of its files over the live one, fsync, remove the directory.

A crash before 2 leaves the old shelf (the next change removes the leftover
staging directory); a crash during 3 leaves files of two generations, which
the next access of any TYL process finishes moving before it reads.  Every
change thus copies the whole shelf: locking an environment whose state is
50 MB writes 50 MB.

Every access holds an exclusive `fcntl.flock` on the sidecar <file>.lock
(POSIX only), so TYL processes on this host sharing the files exclude each
other, and `set_locked` checks and takes the lock in one step.  A read of
an environment with nothing stored creates no file.  Files are created 0600
and the data directory 0700: state holds secrets.
"""

import contextlib
import dbm
import fcntl
import importlib
import os
import shelve
import shutil

from tylstore import ENVIRONMENT_NAME, TYLPersistent, fsync_path, lock_id

TFSTATE_KEY = 'TFSTATE'
LOCK_KEY = 'LOCK_STATE'

# Beside a dbm.sqlite3 shelf (Python 3.13+): a read-only open leaves an empty
# -wal and a -shm, and a crashed writer a -wal or -journal that SQLite would
# replay onto whatever file then has the shelf's name.  The copy already
# holds their content, so they go before the new shelf moves in.
SQLITE_SIDECARS = ('-wal', '-shm', '-journal')

# PyTerraBackTYL's pickles (shelve's default protocol before Python 3.10):
# any Python 3 reads them, so a team can still go back.
PICKLE_PROTOCOL = 3


class PyShelveBackend(TYLPersistent):
    def __init__(self, environment, constants, **kwargs):
        self.environment = environment
        self.root = os.path.normpath(constants.PYSHELVE_DATA_PATH)
        self.path = os.path.join(self.root, environment + constants.PYSHELVE_DB_FILE_NAME)
        self.lock_path = self.path + '.lock'
        self.staging_dir = self.path + '.tyl-staging'
        self.commit_dir = self.path + '.tyl-commit'

    def set_locked(self, state_obj, **kwargs):
        with self._locked(create=True):
            if self._read(LOCK_KEY):
                return False
            self._rewrite({LOCK_KEY: state_obj})
            return True

    def set_unlocked(self, state_obj, **kwargs):
        """Remove the lock; with an ID in `state_obj`, only that holder's."""
        wanted = state_obj.get('ID')
        with self._locked(create=False) as found:
            held = self._read(LOCK_KEY) if found else ''
            if not held or (wanted and lock_id(held) != wanted):
                return False
            self._rewrite({LOCK_KEY: None})
            return True

    def get_lock_state(self):
        with self._locked(create=False) as found:
            return self._read(LOCK_KEY) if found else ''

    def store_tfstate(self, tfstate_obj, **kwargs):
        with self._locked(create=True):
            self._rewrite({TFSTATE_KEY: tfstate_obj})

    def get_tfstate(self):
        with self._locked(create=False) as found:
            return self._read(TFSTATE_KEY) if found else ''

    def delete_tfstate(self, **kwargs):
        """Store '', PyTerraBackTYL's value for "no state yet"."""
        with self._locked(create=False) as found:
            if found:
                self._rewrite({TFSTATE_KEY: ''})

    @classmethod
    def list_environments(cls, constants):
        """The environments with a shelf in PYSHELVE_DATA_PATH, in whichever
        dbm format: a file named <env>PYSHELVE_DB_FILE_NAME, with or without
        the format's own extension (.dat, .dir, .db...)."""
        root, suffix = constants.PYSHELVE_DATA_PATH, constants.PYSHELVE_DB_FILE_NAME
        try:
            names = os.listdir(root)
        except FileNotFoundError:
            return []
        stems = {stem for name in names for stem in (name, os.path.splitext(name)[0])
                 if stem.endswith(suffix)}
        return sorted(stem[:-len(suffix)] for stem in stems
                      if ENVIRONMENT_NAME.fullmatch(stem[:-len(suffix)])
                      and dbm.whichdb(os.path.join(root, stem)))

    def backend_status(self):
        return {
            'shelf': self.path,
            'dbm': dbm.whichdb(self.path),
            'locked': bool(self.get_lock_state()),
        }

    @contextlib.contextmanager
    def _locked(self, create):
        """Hold the flock on <file>.lock, after finishing an interrupted commit.

        Yields False, holding nothing, when `create` is false and nothing is
        stored: neither a lock file (made by every TYL change) nor a shelf
        (one left by PyTerraBackTYL gets its lock file now).
        """
        if create:
            self._make_directory()
        flags = os.O_RDWR
        if create or dbm.whichdb(self.path) is not None:
            flags |= os.O_CREAT
        try:
            fd = os.open(self.lock_path, flags, 0o600)
        except FileNotFoundError:
            fd = None
        if fd is None:
            yield False
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._finish_commit()
            yield True
        finally:
            os.close(fd)  # releases the flock

    def _make_directory(self):
        """Create PYSHELVE_DATA_PATH on the first change, not on a read."""
        if not os.path.isdir(self.root):
            os.makedirs(self.root, mode=0o700, exist_ok=True)
            fsync_path(os.path.dirname(self.root))

    def _read(self, key):
        """The value stored under `key`, or ''."""
        if dbm.whichdb(self.path) is None:
            return ''
        with shelve.open(self.path, 'r') as shelf:
            return shelf.get(key, '')

    def _rewrite(self, changes):
        """Replace the shelf by a copy with `changes` applied (None removes
        the key): steps 1 to 3 of the module docstring."""
        if os.path.exists(self.staging_dir):
            shutil.rmtree(self.staging_dir)
        os.mkdir(self.staging_dir, 0o700)
        self._write_copy(os.path.join(self.staging_dir, os.path.basename(self.path)), changes)
        for name in os.listdir(self.staging_dir):
            fsync_path(os.path.join(self.staging_dir, name))
        fsync_path(self.staging_dir)
        os.rename(self.staging_dir, self.commit_dir)
        fsync_path(self.root)
        self._finish_commit()

    def _write_copy(self, staged, changes):
        """Create the shelf `staged` in the live shelf's format (a new shelf
        in `shelve`'s default one) holding the live keys with `changes`."""
        kind = dbm.whichdb(self.path)
        with contextlib.ExitStack() as stack:
            live, module = {}, dbm
            if kind is not None:
                live = stack.enter_context(dbm.open(self.path, 'r'))
                module = importlib.import_module(kind)
            new = module.open(staged, 'n', 0o600)
            shelf = stack.enter_context(shelve.Shelf(new, protocol=PICKLE_PROTOCOL))
            changed = {key.encode('utf-8') for key in changes}
            for key in live.keys():
                if key not in changed:
                    new[key] = live[key]
            for key, value in changes.items():
                if value is not None:
                    shelf[key] = value

    def _finish_commit(self):
        """Step 3: move the files still in <file>.tyl-commit over the live
        ones.  The writer does it; after a crash, the next access does."""
        try:
            names = os.listdir(self.commit_dir)
        except FileNotFoundError:
            return
        stale = [self.path + suffix for suffix in SQLITE_SIDECARS
                 if os.path.exists(self.path + suffix)]
        for path in stale:
            os.unlink(path)
        if stale:
            fsync_path(self.root)
        for name in names:
            os.replace(os.path.join(self.commit_dir, name), os.path.join(self.root, name))
        fsync_path(self.root)
        os.rmdir(self.commit_dir)

