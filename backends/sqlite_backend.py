"""A store in one SQLite database file, shared by every environment.

    SQLITE_DB_PATH (default tyl.sqlite3, relative to the config file's directory)
        table tfstate(environment, state)    the state, as the exact bytes received
        table tflock(environment, id, info)  the lock while held, as the exact bytes received
        table versions(environment, version, state, created, metadata)
                                             every state stored, numbered from 1 up per
                                             environment, with its metadata as JSON

Only the standard library's sqlite3 is used.  The database is created in
WAL mode and used with synchronous=FULL, so every change is on disk before
the server answers and readers never wait for a writer.  Each change is one
transaction, so a crash leaves the old value or the new, and taking
the lock is a single INSERT OR IGNORE, so several server processes on this
host sharing the file exclude each other; a write checks, in its
transaction, that the lock is still the one its server saw.  The file is created 0600 (SQLite
gives its -wal and -shm files the same mode): state holds secrets.  SQLite
limits a BLOB to 1 GB, far above MAX_BODY_BYTES.

A state is stored twice, in tfstate and as a new row of versions, in one
transaction, which also deletes the versions beyond HISTORY_KEEP and those
older than HISTORY_KEEP_DAYS but the newest: tfstate stays one row per
environment that readers find without a scan, whatever the history holds.
The metadata is JSON text because a serial may exceed SQLite's 64-bit
integers; `created` has its own column for the age limit.
"""

import contextlib
import json
import os
import re
import sqlite3
import tempfile
import threading

from tylstore import (BackendUnavailable, LockChanged, TYLPersistent, create_file_durably,
                      history_cutoff, lock_id)

# Seconds a statement waits for another connection's write before failing
# with "database is locked"; one write of a large state can take seconds.
BUSY_TIMEOUT = 60

SCHEMA = """
CREATE TABLE tfstate (
    environment TEXT PRIMARY KEY,
    state BLOB NOT NULL
);
CREATE TABLE tflock (
    environment TEXT PRIMARY KEY,
    id TEXT NOT NULL,
    info BLOB NOT NULL
);
CREATE TABLE versions (
    environment TEXT NOT NULL,
    version INTEGER NOT NULL,
    state BLOB NOT NULL,
    created TEXT NOT NULL,
    metadata TEXT NOT NULL,
    PRIMARY KEY (environment, version)
);
"""

# A version's identifier as list_versions gives it: no sign, no leading zero.
VERSION_NUMBER = re.compile(r'[1-9][0-9]{0,17}')


class SQLiteBackend(TYLPersistent):
    RAW_BYTES = True

    def __init__(self, environment, constants, **kwargs):
        self.environment = environment
        self.constants = constants
        self.path = constants.SQLITE_DB_PATH
        if not os.path.exists(self.path):
            _create_database(self.path)

    @property
    def db(self):
        return _connection(self.path)

    def _value(self, query):
        """The one column of the environment's row, or None without a row."""
        row = self.db.execute(query, (self.environment,)).fetchone()
        return row[0] if row else None

    def set_locked(self, state_obj, **kwargs):
        """One statement, so two processes racing cannot both insert."""
        raw = kwargs['raw_bytes']
        inserted = self.db.execute(
            'INSERT OR IGNORE INTO tflock (environment, id, info) VALUES (?, ?, ?)',
            (self.environment, lock_id(raw), raw))
        return inserted.rowcount == 1

    def set_unlocked(self, state_obj, **kwargs):
        """Remove the lock; with an ID in `state_obj`, only that holder's.
        One statement, so a lock taken meanwhile by another process is
        never the one removed."""
        wanted = state_obj.get('ID') or ''
        deleted = self.db.execute(
            "DELETE FROM tflock WHERE environment = ? AND (? = '' OR id = ?)",
            (self.environment, wanted, wanted))
        return deleted.rowcount == 1

    def get_lock_state(self):
        info = self._value('SELECT info FROM tflock WHERE environment = ?')
        return info.decode('utf-8') if info is not None else ''

    def store_tfstate(self, tfstate_obj, **kwargs):
        """One transaction: never half a state, never a state without its
        version, and never a state stored after another server process on
        the database changed the lock the server saw (`holder_id`)."""
        state = kwargs['raw_bytes']
        with _transaction(self.db) as db:
            self._check_holder(kwargs.get('holder_id'))
            db.execute('INSERT OR REPLACE INTO tfstate (environment, state) VALUES (?, ?)',
                       (self.environment, state))
            if self.constants.HISTORY_KEEP:
                self._add_version(db, state, kwargs['metadata'])

    def _check_holder(self, holder_id):
        """Raise LockChanged unless the lock is still the one the server saw
        (`holder_id`, '' for none; None when the caller checked nothing);
        call in the transaction that changes the state."""
        if holder_id is not None and holder_id != (
                self._value('SELECT id FROM tflock WHERE environment = ?') or ''):
            raise LockChanged(self.environment)

    def get_tfstate(self):
        return self._value('SELECT state FROM tfstate WHERE environment = ?') or b''

    def list_versions(self):
        rows = self.db.execute('SELECT version, metadata FROM versions WHERE environment = ? '
                               'ORDER BY version DESC', (self.environment,))
        return [dict(json.loads(metadata), version=str(version)) for version, metadata in rows]

    def get_version(self, version):
        if not VERSION_NUMBER.fullmatch(version):
            return None
        row = self.db.execute('SELECT state FROM versions WHERE environment = ? AND version = ?',
                              (self.environment, int(version))).fetchone()
        return row[0] if row else None

    @classmethod
    def list_environments(cls, constants):
        if not os.path.exists(constants.SQLITE_DB_PATH):
            return []
        rows = _connection(constants.SQLITE_DB_PATH).execute(
            'SELECT environment FROM tfstate UNION SELECT environment FROM tflock '
            'UNION SELECT environment FROM versions ORDER BY environment')
        return [environment for environment, in rows]

    def delete_tfstate(self, **kwargs):
        with _transaction(self.db) as db:
            self._check_holder(kwargs.get('holder_id'))
            db.execute('DELETE FROM tfstate WHERE environment = ?', (self.environment,))

    def backend_status(self):
        return {
            'database': self.path,
            'locked': bool(self._value('SELECT 1 FROM tflock WHERE environment = ?')),
            'state_bytes': self._value('SELECT length(state) FROM tfstate WHERE environment = ?') or 0,
            'versions': self._value('SELECT count(*) FROM versions WHERE environment = ?'),
        }

    def _add_version(self, db, state, metadata):
        """Insert `state` as the next version and delete the versions that
        HISTORY_KEEP and HISTORY_KEEP_DAYS let go (inside the caller's
        transaction)."""
        newest = db.execute('SELECT coalesce(max(version), 0) + 1 FROM versions '
                            'WHERE environment = ?', (self.environment,)).fetchone()[0]
        db.execute('INSERT INTO versions (environment, version, state, created, metadata) '
                   'VALUES (?, ?, ?, ?, ?)', (self.environment, newest, state,
                                              metadata.get('created') or '', json.dumps(metadata)))
        db.execute('DELETE FROM versions WHERE environment = ? AND version <= ?',
                   (self.environment, newest - self.constants.HISTORY_KEEP))
        cutoff = history_cutoff(self.constants)
        if cutoff:
            db.execute('DELETE FROM versions WHERE environment = ? AND version < ? AND created < ?',
                       (self.environment, newest, cutoff))


_per_thread = threading.local()


class _Connection(sqlite3.Connection):
    """A connection whose statement that waited BUSY_TIMEOUT for another
    process's write raises BackendUnavailable, a 503 that Terraform
    retries, rather than a 500 that ends the run."""

    def execute(self, *args):
        try:
            return super().execute(*args)
        except sqlite3.OperationalError as error:
            if 'database is locked' not in str(error):
                raise
            raise BackendUnavailable('SQLite database %s stayed locked by another process for %g s'
                                     % (self.path, BUSY_TIMEOUT)) from None


def _connection(path):
    """This thread's connection to the database at `path`.

    Connections belong to the serving threads, not to the environments:
    ten thousand environments then need no more file descriptors than
    there are connections to the server (MAX_CONNECTIONS), and readers of
    different environments still read side by side under WAL.  A thread's
    connections close when it ends.
    """
    connections = _per_thread.__dict__.setdefault('connections', {})
    if path not in connections:
        # isolation_level=None: no implicit transactions, every statement
        # commits on its own.
        db = sqlite3.connect(path, timeout=BUSY_TIMEOUT, isolation_level=None, factory=_Connection)
        db.path = path
        # WAL's default (NORMAL) may lose the last commits on power loss;
        # FULL syncs the log on every commit, before the server answers.
        db.execute('PRAGMA synchronous=FULL')
        connections[path] = db
    return connections[path]


@contextlib.contextmanager
def _transaction(db):
    """A write transaction on `db` (an autocommit connection): committed
    when the block ends, rolled back when it raises."""
    db.execute('BEGIN IMMEDIATE')
    try:
        yield db
        db.execute('COMMIT')
    except BaseException:
        if db.in_transaction:
            db.execute('ROLLBACK')
        raise


def _create_database(path):
    """Create the database at `path`, in WAL mode with its tables, unless
    another process does first.

    Switching a file into WAL mode fails at once, without waiting, while
    another connection has it open, so a new file is never switched in
    place: it is built aside and appears complete under its name, 0600
    (see `tylstore.create_file_durably`).
    """
    directory = os.path.dirname(path)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory) as scratch:
        built = os.path.join(scratch, 'new.sqlite3')
        db = sqlite3.connect(built, isolation_level=None)
        db.execute('PRAGMA journal_mode=WAL')
        db.executescript(SCHEMA)
        db.close()
        with open(built, 'rb') as stream:
            content = stream.read()
    create_file_durably(path, content)
