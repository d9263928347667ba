"""The air-gapped install, run as README.rst tells it: build TYL's wheel from
setup.cfg alone, with setuptools from a throw-away virtual environment, and
fetch PyYAML's on a machine with the package registry, then install both into
a fresh virtual environment from that folder alone, and serve from there.

The commands are read from README.rst, so the README stays true.  pip runs
the install with no configuration and no PIP_* variable, so that nothing but
the folder can supply a package.
"""

import http.client
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import zipfile

from conftest import LISTENING, ROOT

VENV = '/opt/tyl'


def readme_commands(marker):
    """The literal block after the comment `.. marker` in README.rst, one
    command a line, `python3` being the Python running the tests.  A relative
    program such as `build/venv/bin/pip` is found from the command's cwd."""
    with open(os.path.join(ROOT, 'README.rst'), encoding='utf-8') as stream:
        lines = stream.read().splitlines()
    start = lines.index('.. ' + marker) + 1
    while not lines[start].startswith('    '):
        start += 1
    commands = []
    for line in lines[start:]:
        if line and not line.startswith('    '):
            break
        if line.strip():
            words = shlex.split(line)
            commands.append([sys.executable if words[0] == 'python3' else words[0]] + words[1:])
    return commands


def run(command, cwd, env, timeout=300):
    result = subprocess.run(command, cwd=str(cwd), env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            universal_newlines=True, timeout=timeout)
    assert result.returncode == 0, (command, result.stdout)
    return result.stdout


def test_wheels_install_without_an_index_and_serve(tmp_path):
    # The connected machine: a clean copy of the source, so that the build
    # leaves nothing in the repository and takes nothing stale from it.
    source = tmp_path / 'source'
    shutil.copytree(ROOT, str(source), ignore=shutil.ignore_patterns(
        '.*', 'test', 'build', 'data', '*.egg-info', '__pycache__'))
    # setup.cfg alone describes TYL: the top level has no room for these.
    assert not [name for name in ('pyproject.toml', 'setup.py') if (source / name).exists()]
    environ = {k: v for k, v in os.environ.items() if not k.startswith(('TYL_', 'PYTHON'))}
    for command in readme_commands('offline-build'):
        run(command, source, environ)

    # TYL's wheel holds both modules, every backend and the console script.
    wheels = sorted(path.name for path in (source / 'wheels').glob('tyl-*.whl'))
    assert len(wheels) == 1, wheels
    with zipfile.ZipFile(str(source / 'wheels' / wheels[0])) as wheel:
        names = set(wheel.namelist())
        entry_points = [name for name in names if name.endswith('.dist-info/entry_points.txt')]
        assert len(entry_points) == 1, sorted(names)
        scripts = wheel.read(entry_points[0]).decode()
    expected = {'tylserver.py', 'tylstore.py'} | {
        'backends/' + name for name in os.listdir(str(source / 'backends')) if name.endswith('.py')}
    assert len(expected) > 3 and expected <= names, sorted(expected - names)
    assert '[console_scripts]\ntylserver = tylserver:main' in scripts, scripts

    # The target: the folder carried over, and pip told of nothing else.
    target = tmp_path / 'target'
    target.mkdir()
    shutil.copytree(str(source / 'wheels'), str(target / 'wheels'))
    offline = {k: v for k, v in environ.items() if not k.startswith('PIP_')}
    offline['PIP_CONFIG_FILE'] = os.devnull
    venv = str(tmp_path / 'venv')
    install = [[word.replace(VENV, venv) for word in command]
               for command in readme_commands('offline-install')]
    assert install[-1] == [venv + '/bin/tylserver', '--check-config']
    for command in install[:-1]:
        run(command, target, offline)
    checked = run(install[-1], target, offline, timeout=30)
    assert 'config OK: backend file_backend.FileBackend' in checked
    assert 'no config file: the defaults, paths relative to %s' % target in checked

    # And it serves: one lock, write and read through the installed program.
    log_path = tmp_path / 'server.log'
    with open(str(log_path), 'wb') as log:
        server = subprocess.Popen([venv + '/bin/tylserver'], cwd=str(target), stdin=subprocess.DEVNULL,
                                  stdout=log, stderr=subprocess.STDOUT,
                                  env=dict(offline, TYL_BACKEND_SERVICE_PORT='0'))
    try:
        deadline = time.monotonic() + 15
        while not LISTENING.search(log_path.read_text()) and server.poll() is None \
                and time.monotonic() < deadline:
            time.sleep(0.05)
        found = LISTENING.search(log_path.read_text())
        assert found, log_path.read_text()
        state = json.dumps({'version': 4, 'serial': 1, 'lineage': 'offline'}).encode()
        connection = http.client.HTTPConnection('127.0.0.1', int(found.group(2)), timeout=10)
        for method, path, body, expected in [
                ('LOCK', '/lock?env=prod', json.dumps({'ID': 'L1'}), 200),
                ('POST', '/?env=prod&ID=L1', state, 200),
                ('GET', '/?env=prod', None, 200)]:
            connection.request(method, path, body=body)
            response = connection.getresponse()
            assert response.status == expected, (method, response.read())
            answer = response.read()
        connection.close()
        assert answer == state
        assert (target / 'data' / 'prod' / 'terraform.tfstate').read_bytes() == state
        server.send_signal(signal.SIGTERM)
        assert server.wait(10) == 0
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(10)
