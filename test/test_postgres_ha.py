"""High availability: two `tylserver.py` processes on one PostgreSQL database,
driven by real Terraform 1.0.3 (see test_terraform.py) and by raw requests.

The database is the session's throwaway cluster (postgres_cluster.py), a new
database per test; the failover test makes its own primary and standby.
Without PostgreSQL or psycopg these tests skip, unless TYL_REQUIRE_POSTGRES=1.
"""

import json
import socket
import threading
import time

import pytest

import postgres_cluster
from test_terraform import (  # noqa: F401 (tf and tf_env are fixtures)
    HOLDING, RUN_TIMEOUT, assert_lock_free, assert_locked_by, backend, finish_lock_race, lock_body,
    null_resource, raw_lock, raw_unlock, stored, tf, tf_env, v4_resources, wait_for)

# Seconds within which a request must get its 503 while the database is down.
FAST_503 = 5
PARALLEL_ENVS = 8
RACERS = 8
RACE_ROUNDS = 20


@pytest.fixture
def cluster():
    return postgres_cluster.shared()


@pytest.fixture
def servers(cluster, tyl_factory):
    """Servers a and b, started, on a new database of the cluster."""
    config = cluster.config(cluster.new_database())
    return [tyl_factory(name, **config).start() for name in ('a', 'b')]


class FailoverProxy(object):
    """One address standing for several servers, as a load balancer or a DNS
    name with several addresses does for a client: each new connection goes
    to the first server that accepts it.  A connection ends when either of
    its sides does, so a server's death ends the client's connection too."""

    def __init__(self, servers):
        self.upstreams = [('127.0.0.1', server.port) for server in servers]
        self.listener = socket.create_server(('127.0.0.1', 0))
        self.listener.settimeout(0.2)
        self.url = 'http://127.0.0.1:%d' % self.listener.getsockname()[1]
        self.sockets = []
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except socket.timeout:
                continue
            except OSError:  # closed
                return
            client.settimeout(None)
            upstream = self._connect()
            if upstream is None:
                client.close()
                continue
            self.sockets += [client, upstream]
            for source, target in ((client, upstream), (upstream, client)):
                threading.Thread(target=_pipe, args=(source, target), daemon=True).start()

    def _connect(self):
        for address in self.upstreams:
            try:
                upstream = socket.create_connection(address, timeout=5)
            except OSError:
                continue
            upstream.settimeout(None)
            return upstream
        return None

    def close(self):
        self.closed = True
        self.listener.close()
        for sock in self.sockets:
            sock.close()


def _pipe(source, target):
    try:
        while True:
            data = source.recv(65536)
            if not data:
                break
            target.sendall(data)
    except OSError:
        pass
    finally:
        for sock in (source, target):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


@pytest.fixture
def failover_proxy(servers):
    proxy = FailoverProxy(servers)
    yield proxy
    proxy.close()


def split_backend(state_server, lock_server, env):
    """A backend block whose state requests go to one server and whose
    lock requests go to the other, as a load balancer may spread them."""
    return '''terraform {
  backend "http" {
    address        = "%s/?env=%s"
    lock_address   = "%s/lock?env=%s"
    unlock_address = "%s/unlock?env=%s"
  }
}
''' % (state_server.url, env, lock_server.url, env, lock_server.url, env)


def holder_through(server, env):
    """The ID of the lock held on `env`, read through `server` by a probe
    LOCK that must conflict."""
    _, probe = lock_body(who='probe@test')
    status, answer = raw_lock(server, env, probe)
    assert status == 423, (status, answer)
    return json.loads(answer.decode())['ID']


# --------------------------------------------------------------------------
# Locks across servers
# --------------------------------------------------------------------------

def test_lock_races_across_two_servers_have_one_winner(servers):
    for round_number in range(RACE_ROUNDS):
        env = 'race-%d' % round_number
        bodies = [lock_body(who='racer%d@test' % n) for n in range(RACERS)]
        statuses = [None] * RACERS
        barrier = threading.Barrier(RACERS, timeout=30)

        def racer(n):
            barrier.wait()
            statuses[n] = raw_lock(servers[n % 2], env, bodies[n][1])[0]

        threads = [threading.Thread(target=racer, args=(n,)) for n in range(RACERS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert sorted(statuses) == [200] + [423] * (RACERS - 1), 'round %d: %r' % (round_number, statuses)
        winner = bodies[statuses.index(200)]
        for server in servers:
            assert holder_through(server, env) == winner[0]
        assert raw_unlock(servers[1 - statuses.index(200) % 2], env, winner[1])[0] == 200
        assert_lock_free(servers[0], env)


def test_two_applies_through_two_servers_one_wins(servers, tf, tmp_path):
    env = 'race'
    release = tmp_path / 'release'
    works = [tf(name).write(backend(server, env) + null_resource(hold_until=release))
             for name, server in zip(('one', 'two'), servers)]
    for work in works:
        work.init()

    processes = [work.start('apply', '-input=false', '-no-color', '-auto-approve') for work in works]
    wait_for(lambda: any(HOLDING in w.output() for w in works), RUN_TIMEOUT,
             'an apply to reach its provisioner')
    winner = [i for i, w in enumerate(works) if HOLDING in w.output()][0]
    loser = 1 - winner
    holder = holder_through(servers[loser], env)
    assert holder_through(servers[winner], env) == holder

    finish_lock_race(works, processes, winner, release, holder)
    for server in servers:
        _, state = stored(server, env)
        assert v4_resources(state) == [('null_resource', 'a', 1)]
        assert_lock_free(server, env)


def test_kill_9_of_the_server_under_an_apply(servers, failover_proxy, tf, tmp_path):
    """An apply reaches the servers through one address (the proxy) that
    prefers a; a is killed while the apply holds its lock.  The lock,
    taken through a, stays held in the database: b shows it and refuses
    another run.  The apply then stores its state and unlocks through b,
    the client's retries covering the switch; a, restarted, agrees."""
    a, b = servers
    env = 'failover'
    release = tmp_path / 'release'
    work = tf('one').write(backend(failover_proxy, env) + null_resource(hold_until=release))
    other = tf('two').write(backend(b, env) + null_resource())
    work.init()
    other.init()

    process = work.start('apply', '-input=false', '-no-color', '-auto-approve')
    wait_for(lambda: HOLDING in work.output(), RUN_TIMEOUT, 'the apply to reach its provisioner')
    assert '"LOCK /lock?env=failover"' in a.log() and '"LOCK /lock?env=failover"' not in b.log()
    holder = holder_through(b, env)

    a.kill()
    assert holder_through(b, env) == holder
    _, _, text = other.apply(expect=1)
    assert_locked_by(text, holder)

    release.write_text('go')
    code, text = work.finish(process)
    assert code == 0, text
    assert 'Apply complete! Resources: 1 added' in text
    assert '"POST /?ID=%s&env=failover"' % holder in b.log()
    assert '"UNLOCK /unlock?env=failover"' in b.log()
    _, state = stored(b, env)
    assert v4_resources(state) == [('null_resource', 'a', 1)]
    assert_lock_free(b, env)

    a.start()
    assert stored(a, env) == stored(b, env)
    other.apply()
    code, _, text = work.run('plan', '-input=false', '-no-color', '-detailed-exitcode', expect=None)
    assert code == 0, text


def test_eight_environments_applied_in_parallel_across_two_servers(servers, tf):
    """Each run sends its state to one server and its locks to the other."""
    works = []
    for number in range(PARALLEL_ENVS):
        env = 'parallel-%d' % number
        state_server, lock_server = servers[number % 2], servers[1 - number % 2]
        works.append((env, tf(env).write(split_backend(state_server, lock_server, env)
                                          + null_resource(value=env))))
    for _, work in works:
        work.init()
    processes = [work.start('apply', '-input=false', '-no-color', '-auto-approve')
                 for _, work in works]
    for (env, work), process in zip(works, processes):
        code, text = work.finish(process)
        assert code == 0, text
        assert 'Apply complete! Resources: 1 added' in text
    for env, _ in works:
        for server in servers:
            _, state = stored(server, env)
            assert v4_resources(state) == [('null_resource', 'a', 1)]
            assert state['resources'][0]['instances'][0]['attributes']['triggers'] == {'v': env}
            assert_lock_free(server, env)


# --------------------------------------------------------------------------
# The database down, then back
# --------------------------------------------------------------------------

def assert_unavailable(server, method, path, body=None):
    """A 503 within FAST_503 seconds, with Retry-After and a one-line reason."""
    started = time.monotonic()
    status, headers, answer = server.request(method, path, body=body)
    took = time.monotonic() - started
    assert status == 503, (status, answer)
    assert took < FAST_503, took
    assert int(headers['Retry-After']) > 0
    reason = answer.decode()
    assert reason.count('\n') == 1 and 'PostgreSQL' in reason and 'unavailable' in reason, reason
    return took


def test_database_down_gives_503_fast_then_recovers(cluster, servers, tf):
    """With the database stopped every request gets a quick 503, which
    Terraform retries; an apply started during the outage goes through
    once the database is back, and neither server was restarted."""
    env = 'outage'
    work = tf().write(backend(servers[0], env) + null_resource())
    work.init()
    _, body = lock_body()
    work.env = dict(work.env, TF_HTTP_RETRY_MAX='6')

    cluster.stop()
    try:
        for server in servers:
            assert server.request('GET', '/health')[0] == 503
            assert_unavailable(server, 'GET', '/?env=%s' % env)
            assert_unavailable(server, 'LOCK', '/lock?env=%s' % env, body)
            assert_unavailable(server, 'GET', '/?env=never-seen-before')
        process = work.start('apply', '-input=false', '-no-color', '-auto-approve')
        wait_for(lambda: '"LOCK /lock?env=outage" env=outage status=503' in servers[0].log(),
                 RUN_TIMEOUT, "the apply's first LOCK to get its 503")
    finally:
        cluster.start()
    code, text = work.finish(process)
    assert code == 0, text
    for server in servers:
        assert server.request('GET', '/health')[::2] == (200, b'ok\n')
        _, state = stored(server, env)
        assert v4_resources(state) == [('null_resource', 'a', 1)]
        assert_lock_free(server, env)


def test_failover_to_a_synchronous_standby_keeps_locks_and_state(tyl_factory):
    """A primary and its synchronous standby; the server's POSTGRES_DSN names
    both, for the one that accepts writes.  The primary crashes: 503s, as
    the standby is read-only, until it is promoted; then the lock and the
    state confirmed before the crash are there, through the same server."""
    postgres_cluster.shared()  # skips, or fails, here when there can be no cluster
    # Durable: without synchronous_commit a commit does not wait for the standby.
    primary = postgres_cluster.Cluster(durable=True)
    try:
        standby = postgres_cluster.Cluster(durable=True, primary=primary)
        try:
            with primary.admin('postgres') as db:
                db.execute("ALTER SYSTEM SET synchronous_standby_names = '*'")
                db.execute('SELECT pg_reload_conf()')
                wait_for(lambda: db.execute("SELECT 1 FROM pg_stat_replication WHERE sync_state = "
                                            "'sync'").fetchone(), 30, 'the standby to be synchronous')
            server = tyl_factory(**dict(primary.config(), POSTGRES_DSN=(
                'host=127.0.0.1,127.0.0.1 port=%d,%d dbname=tyl user=tyl target_session_attrs=read-write'
                % (primary.port, standby.port)))).start()
            failover_with(server, primary, standby)
        finally:
            standby.remove()
    finally:
        primary.remove()


def failover_with(server, primary, standby):
    env = 'failover'
    holder, body = lock_body(who='before@failover')
    assert raw_lock(server, env, body)[0] == 200
    state = b'{"version":4,"serial":7,"lineage":"l","outputs":{},"resources":[]}\n'
    assert server.request('POST', '/?env=%s&ID=%s' % (env, holder), body=state)[0] == 200

    primary.crash()
    took = assert_unavailable(server, 'GET', '/?env=%s' % env)
    assert took < FAST_503
    _, _, answer = server.request('LOCK', '/lock?env=%s' % env, body=body)
    assert b'read-only' in answer, answer

    standby.promote()
    wait_for(lambda: server.request('GET', '/?env=%s' % env)[0] == 200, 30, 'the promoted standby')
    assert stored(server, env)[0] == state
    assert holder_through(server, env) == holder
    assert raw_lock(server, env, body)[0] == 200          # the holder's retry
    assert raw_unlock(server, env, body)[0] == 200
    assert_lock_free(server, env)
