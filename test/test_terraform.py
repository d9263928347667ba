"""Real Terraform against the real server process.

Terraform 1.0.3, Terraform 0.11.11 and the null provider 2.1.2 come from
terraform_binaries.py (fetched once into test/.tools/).  When they cannot be
had the tests skip, unless TYL_REQUIRE_TERRAFORM=1 (CI sets it): then they fail.

Every terraform run gets its own work directory under tmp_path, its own HOME,
an empty CLI config file, no plugin cache, no TF_* variables from outside, and
a timeout; a run that outlives it is killed with its whole process group.
"""

import json
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

import terraform_binaries
from conftest import TYLSERVER

RUN_TIMEOUT = 120           # seconds for one terraform command
HOLD_TIMEOUT = 60           # seconds a provisioner may hold the lock at most
LOCKED = 'Error acquiring the state lock'
HOLDING = '(local-exec): HOLDING'   # the provisioner's own output, not its command line


# --------------------------------------------------------------------------
# binaries: skip, or fail under TYL_REQUIRE_TERRAFORM=1
# --------------------------------------------------------------------------

def require(*functions):
    """Call each terraform_binaries function and return their paths.

    When one is unavailable the test is skipped here.  Under
    TYL_REQUIRE_TERRAFORM=1 the error is returned instead, and the test FAILS
    (in its own body, not as a setup error) when it asks for a work directory.
    """
    try:
        return [function() for function in functions]
    except terraform_binaries.TerraformUnavailable as error:
        if os.environ.get('TYL_REQUIRE_TERRAFORM') == '1':
            return error
        pytest.skip('Terraform binaries unavailable: %s' % error)


@pytest.fixture
def tf_env(tmp_path):
    """Environment for terraform: isolated HOME and CLI config, no TF_* leaks."""
    home = tmp_path / 'home'
    home.mkdir()
    rc = tmp_path / 'terraformrc'
    rc.write_text('')
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(('TF_', 'CHECKPOINT_'))}
    env.update(HOME=str(home), TF_CLI_CONFIG_FILE=str(rc), CHECKPOINT_DISABLE='1',
               TF_IN_AUTOMATION='1', TF_INPUT='0')
    return env


def workdirs(tmp_path, env, binaries):
    """Yield a maker of work directories; kill their leftovers afterwards."""
    made = []

    def make(name='work'):
        if isinstance(binaries, Exception):
            pytest.fail('TYL_REQUIRE_TERRAFORM=1 but a Terraform binary is unavailable: %s'
                        % binaries, pytrace=False)
        binary, plugins = binaries
        made.append(Workdir(tmp_path / name, binary, plugins, env))
        return made[-1]

    yield make
    for workdir in made:
        workdir.cleanup()


@pytest.fixture
def tf(tmp_path, tf_env):
    """Make Terraform 1.0.3 work directories: tf('name') -> Workdir."""
    binaries = require(terraform_binaries.terraform_1_0, terraform_binaries.null_plugin_dir_1_0)
    yield from workdirs(tmp_path, tf_env, binaries)


@pytest.fixture
def tf011(tmp_path, tf_env):
    """Make Terraform 0.11.11 work directories: tf011('name') -> Workdir."""
    binaries = require(terraform_binaries.terraform_0_11, terraform_binaries.null_plugin_dir_0_11)
    yield from workdirs(tmp_path, tf_env, binaries)


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------

class Workdir(object):
    """One terraform working directory and the binary that runs in it."""

    def __init__(self, path, binary, plugins, env):
        self.path = path
        self.binary = binary
        self.plugins = plugins
        self.env = env
        self.path.mkdir()
        self.background = []

    def write(self, text):
        (self.path / 'main.tf').write_text(text)
        return self

    def command(self, args):
        return [self.binary] + list(args)

    def run(self, *args, expect=0, timeout=RUN_TIMEOUT):
        """Run terraform; return (exit code, stdout, stdout + stderr as text).

        `expect` is the exit code required (None: any).
        """
        process = subprocess.Popen(
            self.command(args), cwd=str(self.path), env=self.env, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        try:
            out, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_group(process)
            out, err = process.communicate()
            pytest.fail('terraform %s timed out after %ss:\n%s%s' % (
                ' '.join(args), timeout, out.decode(errors='replace'), err.decode(errors='replace')))
        text = out.decode(errors='replace') + err.decode(errors='replace')
        if expect is not None and process.returncode != expect:
            pytest.fail('terraform %s exited %d, expected %d:\n%s' % (
                ' '.join(args), process.returncode, expect, text))
        return process.returncode, out, text

    def start(self, *args):
        """Start terraform in the background, output to a file; see finish()."""
        log = open(str(self.path / 'output.log'), 'wb')
        process = subprocess.Popen(
            self.command(args), cwd=str(self.path), env=self.env, stdin=subprocess.DEVNULL,
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self.background.append(process)
        return process

    def output(self):
        path = self.path / 'output.log'
        return path.read_text(errors='replace') if path.exists() else ''

    def finish(self, process, timeout=RUN_TIMEOUT):
        """Wait for a start()ed process; return (exit code, its output)."""
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            kill_group(process)
            pytest.fail('background terraform timed out:\n' + self.output())
        return process.returncode, self.output()

    def cleanup(self):
        for process in self.background:
            if process.poll() is None:
                kill_group(process)

    def init(self, *extra):
        return self.run('init', '-input=false', '-no-color', '-plugin-dir=%s' % self.plugins, *extra)

    def apply(self, *extra, expect=0):
        return self.run('apply', '-input=false', '-no-color', '-auto-approve', *extra, expect=expect)


def kill_group(process):
    """SIGKILL a process we started and everything in its session."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(15)


def backend(server, env):
    return '''terraform {
  backend "http" {
    address        = "%(url)s/?env=%(env)s"
    lock_address   = "%(url)s/lock?env=%(env)s"
    unlock_address = "%(url)s/unlock?env=%(env)s"
  }
}
''' % {'url': server.url, 'env': env}


def null_resource(value='1', name='a', hold_until=None):
    """A null_resource; with `hold_until`, its provisioner waits for that file.

    The wait is bounded (HOLD_TIMEOUT), and the provisioner prints HOLDING
    first, so a test knows the apply holds the lock from then on.
    """
    provisioner = ''
    if hold_until:
        steps = int(HOLD_TIMEOUT * 10)
        provisioner = '''
  provisioner "local-exec" {
    command = "echo HOLDING; i=0; while [ ! -e '%s' ] && [ $i -lt %d ]; do sleep 0.1; i=$((i+1)); done"
  }''' % (hold_until, steps)
    return '''
resource "null_resource" "%s" {
  triggers = {
    v = "%s"
  }%s
}
''' % (name, value, provisioner)


def lock_body(lock_id=None, who='raw@test'):
    """A LockInfo as Terraform would send it (compact JSON, seven keys)."""
    lock_id = lock_id or str(uuid.uuid4())
    return lock_id, json.dumps({
        'ID': lock_id, 'Operation': 'OperationTypeApply', 'Info': '', 'Who': who,
        'Version': '1.0.3', 'Created': '2026-08-21T10:11:12.123456789Z', 'Path': '',
    }, separators=(',', ':')).encode()


def raw_lock(server, env, body):
    status, _, answer = server.request('LOCK', '/lock?env=%s' % env, body=body,
                                       headers={'Content-Type': 'application/json'})
    return status, answer


def raw_unlock(server, env, body):
    status, _, answer = server.request('UNLOCK', '/unlock?env=%s' % env, body=body,
                                       headers={'Content-Type': 'application/json'})
    return status, answer


def assert_lock_free(server, env):
    """A fresh LOCK gets 200 (then is released again)."""
    _, body = lock_body()
    status, answer = raw_lock(server, env, body)
    assert status == 200, 'lock on %s still held: %d %r' % (env, status, answer)
    status, answer = raw_unlock(server, env, body)
    assert status == 200, (status, answer)


def stored(server, env):
    """The stored state of `env`: (raw bytes, parsed JSON), or (None, None)."""
    status, _, body = server.request('GET', '/?env=%s' % env)
    if status == 204:
        return None, None
    assert status == 200, (status, body)
    return body, json.loads(body.decode())


def v4_resources(state):
    return [(r['type'], r['name'], len(r['instances'])) for r in state['resources']]


def flat(text):
    """Collapse whitespace: terraform wraps long error lines at 78 columns."""
    return ' '.join(text.split())


def assert_locked_by(text, holder):
    """Terraform 1.0.3's (and 0.11.11's) lock conflict error, naming `holder`.

    Before 1.2.4 the http client prints no "Lock Info:" block, only the plain
    error "HTTP remote state already locked: ID=<holder>".
    """
    assert LOCKED in text, text
    assert 'HTTP remote state already locked: ID=%s' % holder in flat(text), text


def wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    pytest.fail('timed out after %ss waiting for %s' % (timeout, what))


# --------------------------------------------------------------------------
# Terraform 1.0.3
# --------------------------------------------------------------------------

def test_init_apply_destroy(tyl_server, tf):
    env = 'basic'
    assert stored(tyl_server, env) == (None, None)
    work = tf().write(backend(tyl_server, env) + null_resource())
    work.init()

    work.apply()
    raw, state = stored(tyl_server, env)
    assert state['version'] == 4
    assert state['terraform_version'] == '1.0.3'
    assert v4_resources(state) == [('null_resource', 'a', 1)]
    assert state['resources'][0]['instances'][0]['attributes']['triggers'] == {'v': '1'}
    assert raw.endswith(b'}\n'), raw[-20:]      # Terraform's writer, bytes kept
    assert_lock_free(tyl_server, env)           # apply unlocked

    work.run('destroy', '-input=false', '-no-color', '-auto-approve')
    _, after = stored(tyl_server, env)
    assert after['resources'] == []
    assert after['lineage'] == state['lineage']
    assert after['serial'] > state['serial']
    assert_lock_free(tyl_server, env)


def finish_lock_race(works, processes, winner, release, holder):
    """End two racing applies: the winner applied, the loser failed naming
    `holder`.  The winner is released once the loser is done (or, were the
    lock broken, once the loser is holding too: then both succeed and the
    asserts say so)."""
    loser = 1 - winner
    wait_for(lambda: processes[loser].poll() is not None or HOLDING in works[loser].output(),
             RUN_TIMEOUT, 'the losing apply to finish')
    release.write_text('go')
    loser_code, loser_text = works[loser].finish(processes[loser])
    winner_code, winner_text = works[winner].finish(processes[winner])
    assert winner_code == 0, winner_text
    assert 'Apply complete! Resources: 1 added' in winner_text
    assert loser_code == 1, loser_text
    assert_locked_by(loser_text, holder)


def test_concurrent_applies_one_wins(tyl_server, tf, tmp_path):
    env = 'race'
    release = tmp_path / 'release'
    config = backend(tyl_server, env) + null_resource(hold_until=release)
    works = [tf('one').write(config), tf('two').write(config)]
    for work in works:
        work.init()

    processes = [work.start('apply', '-input=false', '-no-color', '-auto-approve')
                 for work in works]
    # The winner prints HOLDING from its provisioner, lock held; the loser exits.
    wait_for(lambda: any(HOLDING in w.output() for w in works), RUN_TIMEOUT,
             'an apply to reach its provisioner')
    winner = [i for i, w in enumerate(works) if HOLDING in w.output()][0]
    # The holder's ID is readable only through a lock conflict.
    _, probe = lock_body(who='probe@test')
    status, answer = raw_lock(tyl_server, env, probe)
    assert status == 423, (status, answer)
    holder = json.loads(answer.decode())['ID']
    assert holder and holder != json.loads(probe.decode())['ID']

    finish_lock_race(works, processes, winner, release, holder)
    _, state = stored(tyl_server, env)
    assert v4_resources(state) == [('null_resource', 'a', 1)]
    assert_lock_free(tyl_server, env)


def test_force_unlock_of_another_clients_lock(tyl_server, tf):
    env = 'stuck'
    work = tf().write(backend(tyl_server, env) + null_resource())
    work.init()
    holder, body = lock_body(who='crashed@elsewhere')
    assert raw_lock(tyl_server, env, body)[0] == 200

    _, _, text = work.apply(expect=1)
    assert_locked_by(text, holder)
    assert stored(tyl_server, env) == (None, None)

    _, _, text = work.run('force-unlock', '-force', '-no-color', holder)
    assert 'successfully unlocked' in text.lower(), text
    work.apply()
    _, state = stored(tyl_server, env)
    assert v4_resources(state) == [('null_resource', 'a', 1)]
    assert_lock_free(tyl_server, env)


def test_init_migrate_state_from_local(tyl_server, tf):
    env = 'migrated'
    work = tf().write(null_resource('local'))
    work.init()
    work.apply()
    local = json.loads((work.path / 'terraform.tfstate').read_text())
    assert v4_resources(local) == [('null_resource', 'a', 1)]
    assert stored(tyl_server, env) == (None, None)

    work.write(backend(tyl_server, env) + null_resource('local'))
    work.init('-migrate-state', '-force-copy')
    _, state = stored(tyl_server, env)
    assert v4_resources(state) == [('null_resource', 'a', 1)]
    # 1.0.3 writes the migrated state under a new lineage (its remote state
    # manager makes one when the destination is empty): compare the resource.
    assert (state['resources'][0]['instances'][0]['attributes']['id']
            == local['resources'][0]['instances'][0]['attributes']['id'])
    assert_lock_free(tyl_server, env)
    code, _, text = work.run('plan', '-input=false', '-no-color', '-detailed-exitcode')
    assert code == 0, text


def test_state_pull_equals_get(tyl_server, tf):
    env = 'pulled'
    work = tf().write(backend(tyl_server, env) + null_resource())
    work.init()
    work.apply()
    raw, state = stored(tyl_server, env)

    _, out, _ = work.run('state', 'pull')
    assert json.loads(out.decode()) == state
    # 1.0.3 prints the state it read plus one newline of its own.
    assert out == raw + b'\n'


@pytest.mark.parametrize('bounce', ['restart', 'kill'])
def test_server_restart_between_applies(tyl_server, tf, bounce):
    def do_bounce():
        if bounce == 'restart':
            tyl_server.restart()            # SIGTERM, clean exit, start again
        else:
            tyl_server.kill()               # SIGKILL
            tyl_server.start()

    env = 'bounced'
    work = tf().write(backend(tyl_server, env) + null_resource('1'))
    work.init()
    work.apply()
    _, first = stored(tyl_server, env)

    do_bounce()
    code, _, text = work.run('plan', '-input=false', '-no-color', '-detailed-exitcode', expect=None)
    assert code == 0, text

    work.write(backend(tyl_server, env) + null_resource('2'))
    work.apply()
    do_bounce()
    code, _, text = work.run('plan', '-input=false', '-no-color', '-detailed-exitcode', expect=None)
    assert code == 0, text
    _, second = stored(tyl_server, env)
    assert second['lineage'] == first['lineage']
    assert second['serial'] > first['serial']
    assert second['resources'][0]['instances'][0]['attributes']['triggers'] == {'v': '2'}
    assert_lock_free(tyl_server, env)


def test_lock_survives_kill_9(tyl_server, tf):
    env = 'durable'
    work = tf().write(backend(tyl_server, env) + null_resource())
    work.init()
    holder, body = lock_body(who='before@kill')
    assert raw_lock(tyl_server, env, body)[0] == 200

    tyl_server.kill()
    tyl_server.start()

    other, other_body = lock_body(who='after@kill')
    status, answer = raw_lock(tyl_server, env, other_body)
    assert status == 423, (status, answer)
    assert json.loads(answer.decode())['ID'] == holder
    _, _, text = work.apply(expect=1)
    assert_locked_by(text, holder)

    assert raw_unlock(tyl_server, env, body)[0] == 200
    work.apply()
    _, state = stored(tyl_server, env)
    assert v4_resources(state) == [('null_resource', 'a', 1)]


# --------------------------------------------------------------------------
# Terraform 0.11.11 (state version 3)
# --------------------------------------------------------------------------

def test_terraform_0_11_apply_and_lock_conflict(tyl_server, tf011):
    env = 'legacy'
    work = tf011().write(backend(tyl_server, env) + null_resource('1'))
    work.init()
    work.apply()
    raw, state = stored(tyl_server, env)
    assert state['version'] == 3
    assert state['terraform_version'] == '0.11.11'
    resources = state['modules'][0]['resources']
    assert list(resources) == ['null_resource.a']
    assert resources['null_resource.a']['primary']['attributes']['triggers.v'] == '1'
    assert_lock_free(tyl_server, env)
    code, _, text = work.run('plan', '-input=false', '-no-color', '-detailed-exitcode', expect=None)
    assert code == 0, text

    holder, body = lock_body(who='holder@legacy')
    assert raw_lock(tyl_server, env, body)[0] == 200
    work.write(backend(tyl_server, env) + null_resource('2'))
    _, _, text = work.apply(expect=1)
    assert_locked_by(text, holder)
    assert stored(tyl_server, env)[0] == raw          # nothing written

    assert raw_unlock(tyl_server, env, body)[0] == 200
    work.apply()
    _, after = stored(tyl_server, env)
    assert after['version'] == 3
    assert after['serial'] > state['serial']
    assert after['modules'][0]['resources']['null_resource.a']['primary']['attributes'][
        'triggers.v'] == '2'


# --------------------------------------------------------------------------
# History and restore (Terraform 1.0.3)
# --------------------------------------------------------------------------

def counted_resources(count):
    return '''
resource "null_resource" "n" {
  count = %d
  triggers = {
    index = count.index
  }
}
''' % count


def history(server, env):
    status, _, body = server.request('GET', '/history?env=' + env)
    assert status == 200, (status, body)
    return json.loads(body.decode())


def test_restore_of_an_older_version_is_what_terraform_plans_from(tyl_server, tf):
    env = 'restored'
    work = tf().write(backend(tyl_server, env) + counted_resources(3))
    work.init()
    work.apply()
    three = history(tyl_server, env)[0]
    work.write(backend(tyl_server, env) + counted_resources(5))
    work.apply()
    _, five = stored(tyl_server, env)
    assert v4_resources(five) == [('null_resource', 'n', 5)]

    status, _, old = tyl_server.request('GET', '/?env=%s&version=%s' % (env, three['version']))
    assert status == 200 and v4_resources(json.loads(old.decode())) == [('null_resource', 'n', 3)]
    done = subprocess.run([sys.executable, TYLSERVER, '--config', tyl_server.config_path,
                           'restore', env, three['version']], capture_output=True, timeout=RUN_TIMEOUT)
    assert done.returncode == 0, done.stderr

    raw, restored = stored(tyl_server, env)
    assert restored['serial'] == five['serial'] + 1 and restored['lineage'] == five['lineage']
    assert raw == old.replace(b'"serial": %d,' % three['serial'], b'"serial": %d,' % restored['serial'])
    _, _, text = work.run('plan', '-input=false', '-no-color', '-detailed-exitcode', expect=2)
    assert 'Plan: 2 to add, 0 to change, 0 to destroy.' in text, text
    for index in (3, 4):
        assert '# null_resource.n[%d] will be created' % index in text, text
    assert_lock_free(tyl_server, env)
