"""A throwaway PostgreSQL cluster for the tests, on 127.0.0.1.

`shared()` starts one for the whole test session on first use: initdb into
a new temporary directory, a free loopback port, the unix socket inside the
directory, stopped (pg_ctl stop) and removed when the process exits.
initdb and pg_ctl come from PATH, else from the newest
/usr/lib/postgresql/*/bin (Debian's layout).  PostgreSQL refuses to run as
root, so as root the cluster belongs to the `postgres` user and every
server command runs through `runuser -u postgres --`.

TYL connects as the role `tyl`, with a password over TCP (scram-sha-256),
given through POSTGRES_PASSWORD_FILE as in production; the role owns the
database `tyl` and every database or schema made here.

When PostgreSQL or psycopg is missing, `shared()` skips the test, or fails
it under TYL_REQUIRE_POSTGRES=1 (CI sets it).
"""

import atexit
import glob
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile

import pytest

SERVER_USER = 'postgres'
# Seconds initdb, or pg_ctl's start or stop, may take.
COMMAND_TIMEOUT = 120
PASSWORD = 'tyl-test-password'


class PostgresUnavailable(RuntimeError):
    """PostgreSQL or psycopg cannot be had here; the message says why."""


def _binary(name):
    found = shutil.which(name) or max(glob.glob('/usr/lib/postgresql/*/bin/' + name),
                                      key=lambda path: float(path.split('/')[4]), default=None)
    if not found:
        raise PostgresUnavailable('%s not found on PATH nor in /usr/lib/postgresql/*/bin '
                                  '(Debian: apt-get install postgresql)' % name)
    return found


def _free_port():
    with socket.socket() as probe:
        probe.bind(('127.0.0.1', 0))
        return probe.getsockname()[1]


class Cluster(object):
    """One cluster in a temporary directory, started: a new one, or a
    streaming standby of another."""

    def __init__(self, durable=False, primary=None):
        """`durable`: keep fsync on, for figures worth reporting; the tests
        run without it, since nothing here survives the run anyway.
        `primary`: make this cluster a standby of that Cluster."""
        try:
            import psycopg  # noqa: F401
        except ImportError:
            raise PostgresUnavailable("psycopg is not installed: python3 -m pip install 'psycopg[binary]'")
        self.initdb, self.pg_ctl = _binary('initdb'), _binary('pg_ctl')
        self.as_server_user = []
        if os.geteuid() == 0:
            try:
                server_user = pwd.getpwnam(SERVER_USER)
            except KeyError:
                raise PostgresUnavailable('running as root, and there is no %s user to run '
                                          'PostgreSQL as' % SERVER_USER)
            self.as_server_user = ['runuser', '-u', SERVER_USER, '--']
        self.directory = tempfile.mkdtemp(prefix='tyl-postgres-')
        if self.as_server_user:
            os.chown(self.directory, server_user.pw_uid, server_user.pw_gid)
        self.data = os.path.join(self.directory, 'data')
        self.log_path = os.path.join(self.directory, 'server.log')
        self.port = _free_port()
        self.password_file = os.path.join(self.directory, 'tyl.password')
        self._names = itertools.count(1)
        try:
            if primary:
                self._run(_binary('pg_basebackup'), '-D', self.data, '-R', '-X', 'stream', '-c', 'fast', '-d',
                          primary.dsn('postgres', user='postgres', password=PASSWORD))
                self._configure(durable)
                self.start()
            else:
                self._initdb(durable)
                self.start()
                with self.admin('postgres') as db:
                    db.execute("CREATE ROLE tyl LOGIN PASSWORD '%s'" % PASSWORD)
                    db.execute('CREATE DATABASE tyl OWNER tyl')
        except BaseException:
            self.remove()
            raise
        with open(os.open(self.password_file, os.O_WRONLY | os.O_CREAT, 0o600), 'w') as stream:
            stream.write(PASSWORD + '\n')

    def _run(self, *command):
        result = subprocess.run(self.as_server_user + list(command), capture_output=True, text=True,
                                stdin=subprocess.DEVNULL, timeout=COMMAND_TIMEOUT)
        if result.returncode:
            raise PostgresUnavailable('%s failed: %s' % (' '.join(command[:2]),
                                                         (result.stderr or result.stdout).strip()))

    def _initdb(self, durable):
        superuser_password = os.path.join(self.directory, 'superuser.password')
        with open(superuser_password, 'w') as stream:
            stream.write(PASSWORD + '\n')
        if self.as_server_user:
            shutil.chown(superuser_password, SERVER_USER)
        self._run(self.initdb, '-D', self.data, '-U', 'postgres', '-E', 'UTF8', '--locale=C',
                  '--auth-local=trust', '--auth-host=scram-sha-256', '--pwfile=' + superuser_password,
                  '--no-sync')
        self._configure(durable)

    def _configure(self, durable):
        """Settings appended to postgresql.conf, where they win over those
        above them (a standby's copy of its primary's included)."""
        settings = {
            'listen_addresses': "'127.0.0.1'",
            'port': str(self.port),
            'unix_socket_directories': "'%s'" % self.directory,
            'max_connections': '200',
        }
        if not durable:
            settings.update(fsync='off', full_page_writes='off', synchronous_commit='off')
        with open(os.path.join(self.data, 'postgresql.conf'), 'a') as conf:
            conf.writelines('%s = %s\n' % item for item in settings.items())

    def promote(self):
        """Make a standby the primary, as a failover does."""
        self._run(self.pg_ctl, '-D', self.data, '-w', '-t', str(COMMAND_TIMEOUT), 'promote')

    def crash(self):
        """Stop at once, as a crash would, without a checkpoint."""
        self._run(self.pg_ctl, '-D', self.data, '-m', 'immediate', '-w', 'stop')

    def start(self):
        self._run(self.pg_ctl, '-D', self.data, '-l', self.log_path, '-w',
                  '-t', str(COMMAND_TIMEOUT), 'start')

    def stop(self):
        """A fast shutdown: sessions are ended, the data is kept."""
        self._run(self.pg_ctl, '-D', self.data, '-m', 'fast', '-w', '-t', str(COMMAND_TIMEOUT), 'stop')

    def remove(self):
        if os.path.exists(os.path.join(self.data, 'postmaster.pid')):
            self.crash()
        shutil.rmtree(self.directory, ignore_errors=True)

    def dsn(self, dbname='tyl', **extra):
        """A libpq connection string, for the role `tyl` and without a
        password unless `extra` says otherwise."""
        params = dict(dict(host='127.0.0.1', port=self.port, dbname=dbname, user='tyl'), **extra)
        return ' '.join('%s=%s' % item for item in params.items())

    def admin(self, dbname):
        """A superuser connection (autocommit) to `dbname`, for setting up tests."""
        import psycopg
        return psycopg.connect(host='127.0.0.1', port=self.port, dbname=dbname, user='postgres',
                               password=PASSWORD, autocommit=True)

    def new_database(self):
        """The name of a new empty database, owned by `tyl`."""
        name = 'tyl_%d' % next(self._names)
        with self.admin('postgres') as db:
            db.execute('CREATE DATABASE %s OWNER tyl' % name)
        return name

    def new_schema(self):
        """The name of a new empty schema in the database `tyl`, owned by `tyl`."""
        name = 'store_%d' % next(self._names)
        with self.admin('tyl') as db:
            db.execute('CREATE SCHEMA %s AUTHORIZATION tyl' % name)
        return name

    def config(self, dbname='tyl', **extra):
        """TYL config keys for this cluster's database `dbname`."""
        return {'BACKEND_CLASS': 'postgres_backend.PostgresBackend',
                'POSTGRES_DSN': self.dsn(dbname, **extra),
                'POSTGRES_PASSWORD_FILE': self.password_file}


_shared = []


def shared():
    """The session's cluster, started on first use; skip the calling test,
    or fail it under TYL_REQUIRE_POSTGRES=1, when there can be none."""
    if not _shared:
        try:
            _shared.append(Cluster())
            atexit.register(_shared[0].remove)
        except Exception as error:  # remembered, so that one failure costs one try
            _shared.append(error)
    if isinstance(_shared[0], Exception):
        if os.environ.get('TYL_REQUIRE_POSTGRES') == '1':
            pytest.fail('TYL_REQUIRE_POSTGRES=1 but PostgreSQL is unavailable: %s' % _shared[0],
                        pytrace=False)
        pytest.skip('PostgreSQL unavailable: %s' % _shared[0])
    return _shared[0]


def store_config():
    """The config of one fresh store of the conformance suite: a new schema
    of the shared cluster, first in the search path."""
    cluster = shared()
    return cluster.config(options='-csearch_path=%s' % cluster.new_schema())
