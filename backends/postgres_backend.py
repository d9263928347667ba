"""State, locks and history in PostgreSQL, shared by several TYL servers.

    table tfstate(environment, state)              the state, the exact bytes received
    table tflock(environment, id, info, created)   the lock while held, the exact bytes received
    table versions(id, environment, state, serial, lineage, size, sha256,
                   created, lock_id, who)           every state stored, within the history limits
    table schema_version(version)                  how many of MIGRATIONS have run

This is the store for high availability: N TYL servers behind one name, on
one PostgreSQL that has its own replication.  What makes that safe:

- A lock is a row, taken by one INSERT ... ON CONFLICT DO NOTHING, so of
  two servers racing exactly one inserts it.  It stays until an UNLOCK
  deletes it.  It belongs to no connection (a session advisory lock would
  vanish with its connection), so a TYL server that dies leaves the lock
  held and visible to the others, as Terraform expects.
- A write stores the state and its version in one transaction that first
  re-reads the lock row FOR SHARE and checks it is still the lock the
  server checked (`holder_id`).  An unlock through another server
  then waits for the write to commit, and a write whose lock went away in
  between stores nothing: LockChanged, a 503, whose retry gets the
  definitive 409 or 423.
- Whatever keeps the database out of reach (refused or timed-out connection,
  a connection lost, a server shutting down or starting up, a statement or
  row-lock wait past POSTGRES_STATEMENT_TIMEOUT, a read-only standby after a
  failover) is BackendUnavailable: the request gets a 503 with the reason
  and Retry-After at once, and Terraform retries.  The connection is
  dropped, and the next request connects afresh, so the server recovers by
  itself when the database is back.

Connections come from a small pool per configuration, at most
POSTGRES_POOL_SIZE, shared by all environments, rather than one per serving
thread as sqlite_backend has: each PostgreSQL connection is a server process
and a slot of its max_connections, shared by every TYL server, and serving
threads come and go with the client connections (up to MAX_CONNECTIONS of
them), so per-thread connections would be both too many and reconnected too
often.  An idle connection whose socket has something to read was closed by
the server (a restart or failover says so first) and is replaced before use.

psycopg 3 is needed (the `postgres` extra); without it the server refuses to
start and says what to install.
"""

import contextlib
import hashlib
import math
import re
import select
import threading
import time
import weakref

try:
    import psycopg
    from psycopg.conninfo import conninfo_to_dict
except ImportError as error:
    raise ImportError("postgres_backend needs psycopg 3: "
                      "python3 -m pip install 'psycopg[binary]'") from error

from tylstore import (CREATED_FORMAT, BackendUnavailable, LockChanged, TYLPersistent, history_cutoff,
                      lock_id)

# Failures that say the database is out of reach for now, not that a
# request or the schema is wrong.
UNREACHABLE = (psycopg.OperationalError, psycopg.errors.ReadOnlySqlTransaction)

# Taken by the transaction that creates or migrates the schema, so that
# servers starting together on an empty database do it one at a time.
MIGRATION_LOCK = 0x54594c  # 'TYL'
# The first key of each environment's advisory lock (pg_advisory_xact_lock
# with two keys, which never meets the one-key MIGRATION_LOCK).
ENVIRONMENT_LOCKS = 0x54594c

# MIGRATIONS[n] takes the schema from version n to n + 1.  Append; never edit.
MIGRATIONS = [
    """
    CREATE TABLE tfstate (
        environment text PRIMARY KEY,
        state bytea NOT NULL
    );
    CREATE TABLE tflock (
        environment text PRIMARY KEY,
        id text NOT NULL,
        info bytea NOT NULL,
        created timestamptz NOT NULL DEFAULT now()
    );
    CREATE TABLE versions (
        id bigserial PRIMARY KEY,
        environment text NOT NULL,
        state bytea NOT NULL,
        serial numeric,
        lineage text,
        size bigint NOT NULL,
        sha256 text NOT NULL,
        created text NOT NULL,
        lock_id text,
        who text
    );
    CREATE INDEX versions_by_environment ON versions (environment, id);
    """,
]


class PostgresBackend(TYLPersistent):
    RAW_BYTES = True

    def __init__(self, environment, constants, **kwargs):
        self.environment = environment
        self.constants = constants
        self.pool = _pool(constants)

    def _execute(self, query, *params):
        """Run one statement (autocommit): (rows affected, rows returned)."""
        with self.pool.connection() as db:
            cursor = db.execute(query, params, binary=True)
            return cursor.rowcount, cursor.fetchall() if cursor.description else []

    def _value(self, query):
        """The one column of the environment's row, or None without a row."""
        _, rows = self._execute(query, self.environment)
        return rows[0][0] if rows else None

    def set_locked(self, state_obj, **kwargs):
        """One statement, so two servers racing cannot both insert, under
        the environment's advisory lock (see store_tfstate)."""
        raw = kwargs['raw_bytes']
        with self.pool.connection() as db, db.transaction():
            self._exclude_changes(db)
            inserted = db.execute('INSERT INTO tflock (environment, id, info) VALUES (%s, %s, %b) '
                                  'ON CONFLICT (environment) DO NOTHING',
                                  (self.environment, lock_id(raw), raw)).rowcount
        return inserted == 1

    def set_unlocked(self, state_obj, **kwargs):
        """Remove the lock; with an ID in `state_obj`, only that holder's.
        One statement, so a lock taken meanwhile through another server is
        never the one removed."""
        wanted = state_obj.get('ID') or ''
        deleted, _ = self._execute(
            "DELETE FROM tflock WHERE environment = %s AND (%s = '' OR id = %s)",
            self.environment, wanted, wanted)
        return deleted == 1

    def get_lock_state(self):
        info = self._value('SELECT info FROM tflock WHERE environment = %s')
        return info.decode('utf-8') if info is not None else ''

    def store_tfstate(self, tfstate_obj, **kwargs):
        """State and version in one transaction, checked against the lock
        the server saw (`holder_id`, '' for none) while holding that lock
        row, so that no unlock through another server slips in between, and
        the environment's advisory lock, so that no LOCK does either when
        there was no row to hold."""
        body, holder_id = kwargs['raw_bytes'], kwargs.get('holder_id')
        with self.pool.connection() as db, db.transaction():
            self._exclude_changes(db)
            self._check_holder(db, holder_id)
            db.execute('INSERT INTO tfstate (environment, state) VALUES (%s, %b) '
                       'ON CONFLICT (environment) DO UPDATE SET state = EXCLUDED.state',
                       (self.environment, body))
            self._keep_version(db, body, kwargs.get('metadata') or {})

    def _check_holder(self, db, holder_id):
        """Raise LockChanged unless the lock is still the one the server saw
        (`holder_id`, '' for none; None when the caller checked nothing),
        holding its row until the transaction ends."""
        if holder_id is not None:
            held = db.execute('SELECT id FROM tflock WHERE environment = %s FOR SHARE',
                              (self.environment,)).fetchone()
            if (held[0] if held else '') != holder_id:
                raise LockChanged(self.environment)

    def _exclude_changes(self, db):
        """Take the environment's transaction-level advisory lock, which a
        LOCK and a state write hold until they commit."""
        db.execute('SELECT pg_advisory_xact_lock(%s, hashtext(%s))',
                   (ENVIRONMENT_LOCKS, self.environment))

    def _keep_version(self, db, body, metadata):
        """Record `body` as a version, then drop those past HISTORY_KEEP
        and HISTORY_KEEP_DAYS (never the newest)."""
        keep = self.constants.HISTORY_KEEP
        if keep:
            serial = metadata.get('serial')
            newest = db.execute(
                'INSERT INTO versions (environment, state, serial, lineage, size, sha256, '
                'created, lock_id, who) VALUES (%s, %b, %s, %s, %s, %s, %s, %s, %s) RETURNING id',
                (self.environment, body,
                 serial if isinstance(serial, int) and not isinstance(serial, bool) else None,
                 _text(metadata.get('lineage')), len(body),
                 metadata.get('sha256') or hashlib.sha256(body).hexdigest(),
                 metadata.get('created') or time.strftime(CREATED_FORMAT, time.gmtime()),
                 _text(metadata.get('lock_id')), _text(metadata.get('who')))).fetchone()[0]
        else:
            newest = None
        db.execute('DELETE FROM versions WHERE environment = %(env)s AND id IS DISTINCT FROM %(newest)s '
                   'AND (id NOT IN (SELECT id FROM versions WHERE environment = %(env)s '
                   '                ORDER BY id DESC LIMIT %(keep)s) '
                   '     OR created < %(cutoff)s)',
                   {'env': self.environment, 'newest': newest, 'keep': keep,
                    'cutoff': history_cutoff(self.constants)})

    def get_tfstate(self):
        return self._value('SELECT state FROM tfstate WHERE environment = %s') or b''

    def delete_tfstate(self, **kwargs):
        """Remove the state, checked against the lock as store_tfstate
        checks; its versions stay in the history."""
        with self.pool.connection() as db, db.transaction():
            self._exclude_changes(db)
            self._check_holder(db, kwargs.get('holder_id'))
            db.execute('DELETE FROM tfstate WHERE environment = %s', (self.environment,))

    def list_versions(self):
        _, rows = self._execute(
            'SELECT id, serial, lineage, size, sha256, created, lock_id, who FROM versions '
            'WHERE environment = %s ORDER BY id DESC', self.environment)
        return [{'version': str(row[0]), 'serial': int(row[1]) if row[1] is not None else None,
                 'lineage': row[2], 'size': row[3], 'sha256': row[4], 'created': row[5],
                 'lock_id': row[6], 'who': row[7]} for row in rows]

    def get_version(self, version):
        if not (isinstance(version, str) and re.fullmatch('[1-9][0-9]{0,17}', version)):
            return None
        _, rows = self._execute('SELECT state FROM versions WHERE environment = %s AND id = %s',
                                self.environment, int(version))
        return rows[0][0] if rows else None

    @classmethod
    def list_environments(cls, constants):
        with _pool(constants).connection() as db:
            rows = db.execute('SELECT environment FROM tfstate UNION SELECT environment FROM tflock '
                              'UNION SELECT environment FROM versions').fetchall()
        return sorted(row[0] for row in rows)

    def backend_status(self):
        _, rows = self._execute(
            'SELECT (SELECT length(state) FROM tfstate WHERE environment = %s), '
            'EXISTS (SELECT 1 FROM tflock WHERE environment = %s), '
            '(SELECT count(*) FROM versions WHERE environment = %s)',
            self.environment, self.environment, self.environment)
        state_bytes, locked, versions = rows[0]
        return {'database': self.pool.name, 'locked': locked, 'state_bytes': state_bytes or 0,
                'versions': versions}


def _text(value):
    return value if isinstance(value, str) else None


# --------------------------------------------------------------------------
# Connections
# --------------------------------------------------------------------------

class Pool(object):
    """At most `size` connections to the database of libpq `params`, for
    every environment.

    A request waits at most `wait` seconds for a free connection.  Idle
    connections are reused newest first; one that saw any error is closed,
    since its state is then unknown.  No lock is held while connecting, so
    with the database out of reach each request fails on its own timeout,
    not after the others'.
    """

    def __init__(self, params, password_file, size, wait):
        self.name = '%s:%s/%s' % (params.get('host') or params.get('hostaddr') or 'localhost',
                                  params.get('port') or 5432, params.get('dbname') or '-')
        self._params = params
        self._password_file = password_file
        self._size = size
        self._wait = wait
        self._slots = threading.BoundedSemaphore(size)
        self._idle = []
        self._idle_lock = threading.Lock()
        self._schema_checked = False

    @contextlib.contextmanager
    def connection(self):
        """A connection for one request; failures to reach the database
        become BackendUnavailable, naming the database and the cause."""
        if not self._slots.acquire(timeout=self._wait):
            raise BackendUnavailable('all %d connections to PostgreSQL %s stayed busy for %s s'
                                     % (self._size, self.name, self._wait))
        connection = None
        try:
            connection = self._reusable() or self._connect()
            yield connection
        except BaseException as error:
            if connection is not None:
                connection.close()
                connection = None
            if isinstance(error, UNREACHABLE):
                raise BackendUnavailable('PostgreSQL %s unavailable: %s'
                                         % (self.name, ' '.join(str(error).split()))) from error
            raise
        finally:
            if connection is not None:
                with self._idle_lock:
                    self._idle.append(connection)
            self._slots.release()

    def _reusable(self):
        """The newest idle connection still open, or None."""
        while True:
            with self._idle_lock:
                if not self._idle:
                    return None
                connection = self._idle.pop()
            if _still_open(connection):
                return connection
            connection.close()

    def _connect(self):
        """A new autocommit connection.  The first one also creates or
        migrates the schema.  The password file is read each time, so a
        rotated password needs no restart."""
        params = self._params
        if self._password_file:
            with open(self._password_file, encoding='utf-8') as stream:
                params = dict(params, password=stream.read().rstrip('\r\n'))
        connection = psycopg.connect(autocommit=True, **params)
        try:
            if not self._schema_checked:
                _migrate(connection)
                self._schema_checked = True
        except BaseException:
            connection.close()
            raise
        return connection


def _still_open(connection):
    """Whether an idle connection is still usable: nothing may be waiting
    on its socket, except the server's goodbye (a shutdown notice) or the
    end of the stream."""
    if connection.closed:
        return False
    readable, _, _ = select.select([connection.fileno()], [], [], 0)
    return not readable


# One pool per configuration, alive while a backend instance uses it.
_pools = weakref.WeakValueDictionary()
_pools_lock = threading.Lock()


def _pool(constants):
    """The pool for `constants`, made on first use."""
    if not constants.POSTGRES_DSN:
        raise ValueError('postgres_backend needs POSTGRES_DSN, the libpq connection string of '
                         'its database, as "host=db.example.com dbname=tyl user=tyl"')
    key = (constants.POSTGRES_DSN, constants.POSTGRES_PASSWORD_FILE, constants.POSTGRES_POOL_SIZE,
           constants.POSTGRES_CONNECT_TIMEOUT, constants.POSTGRES_STATEMENT_TIMEOUT)
    with _pools_lock:
        pool = _pools.get(key)
        if pool is None:
            pool = _pools[key] = Pool(_connection_parameters(constants), constants.POSTGRES_PASSWORD_FILE,
                                      constants.POSTGRES_POOL_SIZE, constants.POSTGRES_CONNECT_TIMEOUT)
        return pool


def _connection_parameters(constants):
    """libpq parameters: POSTGRES_DSN's, with the timeouts added unless it
    sets them itself.  A statement (row-lock waits included) or a
    transaction left idle ends after POSTGRES_STATEMENT_TIMEOUT on the
    server; TCP keepalives and tcp_user_timeout end a connection whose
    peer vanished from the network."""
    params = conninfo_to_dict(constants.POSTGRES_DSN)
    statement_ms = int(constants.POSTGRES_STATEMENT_TIMEOUT * 1000)
    settings = ' '.join('-c %s=%d' % (name, statement_ms) for name in (
        'statement_timeout', 'idle_in_transaction_session_timeout'))
    params['options'] = (settings + ' ' + params.get('options', '')).strip()
    defaults = {
        'connect_timeout': max(2, math.ceil(constants.POSTGRES_CONNECT_TIMEOUT)),
        'application_name': 'tyl',
        'keepalives': 1,
        'keepalives_idle': 5,
        'keepalives_interval': 2,
        'keepalives_count': 3,
        'tcp_user_timeout': statement_ms,
    }
    for name, value in defaults.items():
        params.setdefault(name, value)
    return params


def _migrate(db):
    """Create the schema, or bring it to the newest version, in one
    transaction; a server that runs them at the same time waits."""
    with db.transaction():
        db.execute('SELECT pg_advisory_xact_lock(%s)', (MIGRATION_LOCK,))
        db.execute('CREATE TABLE IF NOT EXISTS schema_version (version integer NOT NULL)')
        row = db.execute('SELECT version FROM schema_version').fetchone()
        version = row[0] if row else 0
        if version > len(MIGRATIONS):
            raise RuntimeError('the PostgreSQL schema is at version %d, newer than this TYL knows '
                               '(%d): upgrade TYL' % (version, len(MIGRATIONS)))
        for migration in MIGRATIONS[version:]:
            db.execute(migration)
        if row is None:
            db.execute('INSERT INTO schema_version (version) VALUES (%s)', (len(MIGRATIONS),))
        elif version < len(MIGRATIONS):
            db.execute('UPDATE schema_version SET version = %s', (len(MIGRATIONS),))
