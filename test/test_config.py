"""Configuration, plugin loading and the command line, through the real program."""

import os
import subprocess
import sys

import pytest
import yaml

import tylserver
from conftest import ROOT, TYLSERVER


def run_tylserver(*args, env=None, timeout=30):
    environ = {k: v for k, v in os.environ.items() if not k.startswith('TYL_')}
    environ.update(env or {})
    return subprocess.run([sys.executable, TYLSERVER] + list(args), capture_output=True,
                          text=True, env=environ, timeout=timeout)


def write_config(tmp_path, **config):
    path = tmp_path / 'config.yaml'
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_config_yaml_lists_every_key_with_its_default_and_a_comment():
    path = os.path.join(ROOT, 'config.yaml')
    with open(path) as stream:
        shipped = yaml.safe_load(stream)
    assert set(shipped) == set(tylserver.CONFIG_KEYS)
    for key, (default, _) in tylserver.CONFIG_KEYS.items():
        assert shipped[key] == default, key
    lines = open(path).read().splitlines()
    for number, line in enumerate(lines):
        if line and not line.startswith((' ', '#')):
            assert lines[number - 1].startswith('# '), 'no comment above %s' % line


def test_shipped_config_checks_out():
    result = run_tylserver('--check-config')
    assert result.returncode == 0, result.stderr
    assert 'file_backend.FileBackend' in result.stdout


def test_version():
    result = run_tylserver('--version')
    assert result.stdout.strip() == 'TYL ' + tylserver.__version__


@pytest.mark.parametrize('key, value', [
    ('BACKEND_SERVICE_PORT', 70000),
    ('BACKEND_SERVICE_PORT', 'http'),
    ('BACKEND_SERVICE_PORT', True),
    ('MAX_BODY_BYTES', 0),
    ('MAX_CONNECTIONS', -1),
    ('REQUEST_TIMEOUT', 'soon'),
    ('USE_SSL', 'yes please'),
    ('FORCE_UNLOCK', 1),
    ('LOG_LEVEL', 'LOUD'),
    ('BACKEND_CLASS', 'no_dot'),
    ('POST_PROCESS_CLASSES', [3]),
    ('HELPER_HOSTNAME_QUERY_MAP', ['a']),
    ('FILE_DATA_PATH', ''),
    ('HISTORY_KEEP', -1),
    ('HISTORY_KEEP', 10 ** 23),
    ('HISTORY_KEEP_DAYS', 'a week'),
    ('HISTORY_KEEP_DAYS', 10 ** 12),
    ('REQUEST_TIMEOUT', float('inf')),
    ('NOTIFY_TIMEOUT', float('nan')),
    ('LOG_FILE', 'no-such-directory/tyl.log'),
])
def test_a_bad_value_stops_start_up_with_one_line_naming_the_key(tmp_path, key, value):
    result = run_tylserver('--config', write_config(tmp_path, **{key: value}))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert key in lines[0] and 'Traceback' not in result.stderr


def test_an_environment_variable_overrides_a_key_with_a_yaml_value(tmp_path):
    config = write_config(tmp_path, BACKEND_SERVICE_PORT=1234)
    result = run_tylserver('--config', config, '--check-config',
                           env={'TYL_BACKEND_SERVICE_PORT': '4321'})
    assert result.returncode == 0 and '127.0.0.1:4321' in result.stdout
    result = run_tylserver('--config', config, '--check-config',
                           env={'TYL_BACKEND_SERVICE_PORT': 'many'})
    assert result.returncode == 2 and 'BACKEND_SERVICE_PORT' in result.stderr


def test_unknown_keys_pass_through_and_paths_are_relative_to_the_config(tmp_path):
    config = write_config(tmp_path, MY_PLUGIN_SETTING={'a': [1, 2]}, FILE_DATA_PATH='states')
    constants = tylserver.load_config(config, environ={'TYL_OTHER_SETTING': 'hello'})
    assert constants.MY_PLUGIN_SETTING == {'a': [1, 2]}
    assert constants.OTHER_SETTING == 'hello'
    assert constants.FILE_DATA_PATH == str(tmp_path / 'states')
    assert constants.HTTP_LOCKED == 423


@pytest.mark.parametrize('text, message', [
    ('BACKEND_CLASS: [unclosed', 'not valid YAML'),
    ('- a list', 'mapping'),
])
def test_an_unreadable_config_file_is_one_line(tmp_path, text, message):
    path = tmp_path / 'config.yaml'
    path.write_text(text)
    result = run_tylserver('--config', str(path))
    assert result.returncode == 2 and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_missing_config_file_is_one_line(tmp_path):
    result = run_tylserver('--config', str(tmp_path / 'absent.yaml'))
    assert result.returncode == 2 and 'cannot read config file' in result.stderr


PLUGINS = {
    'not_subclass.py': 'class Store(object):\n    pass\n',
    'half_done.py': ('from tylstore import TYLPersistent\n'
                     'class Store(TYLPersistent):\n'
                     '    def __init__(self, environment, constants, **kwargs):\n'
                     '        pass\n'
                     '    def get_tfstate(self):\n'
                     '        return ""\n'),
    'needs_missing.py': 'import a_package_nobody_installed\n',
    'raises_on_import.py': 'raise RuntimeError("bad plugin")\n',
}


@pytest.mark.parametrize('backend_class, message', [
    ('nowhere.Store', 'cannot load module nowhere'),
    ('not_subclass.Store', 'not a subclass of TYLPersistent'),
    ('not_subclass.Missing', 'has no class Missing'),
    ('half_done.Store', 'does not implement get_lock_state, set_locked, set_unlocked, store_tfstate'),
    ('needs_missing.Store', "No module named 'a_package_nobody_installed'"),
    ('raises_on_import.Store', 'RuntimeError: bad plugin'),
])
def test_a_bad_plugin_stops_start_up_with_one_line(tmp_path, backend_class, message):
    plugins = tmp_path / 'plugins'
    plugins.mkdir()
    for name, text in PLUGINS.items():
        (plugins / name).write_text(text)
    config = write_config(tmp_path, BACKEND_PLUGINS_PATH='plugins', BACKEND_CLASS=backend_class)
    result = run_tylserver('--config', config)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert 'BACKEND_CLASS' in result.stderr and message in result.stderr


def test_a_bad_post_processor_names_its_key(tmp_path):
    config = write_config(tmp_path, POST_PROCESS_CLASSES='file_backend.FileBackend')
    result = run_tylserver('--config', config)
    assert result.returncode == 2
    assert 'POST_PROCESS_CLASSES' in result.stderr and 'TYLNonpersistent' in result.stderr


def test_the_template_backend_refuses_to_run_unless_told(tyl_factory):
    refusing = tyl_factory('refusing', BACKEND_CLASS='TEMPLATE_backend.TemplateBackend').start()
    status, _, body = refusing.request('GET', '/?env=a')
    assert status == 500 and b'YES_I_KNOW_WHAT_I_AM_DOING' in body
    assert body.count(b'\n') == 1
    told = tyl_factory('told', BACKEND_CLASS='TEMPLATE_backend.TemplateBackend',
                       YES_I_KNOW_WHAT_I_AM_DOING=True).start()
    assert told.request('POST', '/?env=a', b'{"version": 4}')[0] == 200
    assert told.request('GET', '/?env=a')[2] == b'{"version": 4}'


@pytest.mark.parametrize('config, message', [
    ({'USE_SSL': True, 'SSL_PUBLIC_KEY': 'none.pem', 'SSL_PRIVATE_KEY': 'none.key'},
     'SSL_PUBLIC_KEY/SSL_PRIVATE_KEY: cannot load '),
    ({'AUDIT_LOG': '.'}, 'AUDIT_LOG: '),
    ({'LOG_FILE': '.'}, 'LOG_FILE: '),
    ({'BACKEND_CLASS': 'sqlite_backend.SQLiteBackend', 'SQLITE_DB_PATH': '.'}, 'SQLITE_DB_PATH: '),
])
def test_the_check_finds_what_start_up_would(tmp_path, config, message):
    result = run_tylserver('--config', write_config(tmp_path, **config), '--check-config')
    assert result.returncode == 2 and not result.stdout
    assert result.stderr.startswith('tylserver: error: ' + message)
    assert result.stderr.count('\n') == 1


@pytest.mark.parametrize('config, key, directory', [
    ({'FILE_DATA_PATH': 'a-file/data'}, 'FILE_DATA_PATH', 'a-file/data'),
    ({'BACKEND_CLASS': 'sqlite_backend.SQLiteBackend', 'SQLITE_DB_PATH': 'a-file/db/tyl.sqlite3'},
     'SQLITE_DB_PATH', 'a-file/db'),
    ({'AUDIT_LOG': 'a-file/audit.jsonl'}, 'AUDIT_LOG', 'a-file'),
], ids=['FILE_DATA_PATH', 'SQLITE_DB_PATH', 'AUDIT_LOG'])
@pytest.mark.parametrize('check_only', [False, True], ids=['start', 'check-config'])
def test_a_directory_the_server_cannot_write_stops_start_up_and_the_check(
        tmp_path, config, key, directory, check_only):
    # Reads of a directory that cannot be made answer "no state": the
    # server would serve /health and GETs and fail every LOCK.
    (tmp_path / 'a-file').write_bytes(b'')
    result = run_tylserver('--config', write_config(tmp_path, **config),
                           *(['--check-config'] if check_only else []))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        'tylserver: error: %s: cannot write %s: no file can be created in %s (Not a directory)'
        % (key, tmp_path / directory, tmp_path / 'a-file')]
    assert sorted(os.listdir(str(tmp_path))) == ['a-file', 'config.yaml']


def test_a_port_in_use_is_one_line(tyl_server, tmp_path):
    config = write_config(tmp_path, BACKEND_SERVICE_PORT=tyl_server.port)
    result = run_tylserver('--config', config)
    assert result.returncode == 2
    assert 'cannot listen on 127.0.0.1:%d' % tyl_server.port in result.stderr


def test_ipv6_loopback(tyl_factory):
    try:
        server = tyl_factory(BACKEND_SERVICE_IP='::1').start()
    except RuntimeError as error:
        if 'Cannot assign requested address' in str(error) or 'not supported' in str(error):
            pytest.skip('this machine has no IPv6 loopback')
        raise
    assert '[::1]' in server.log()


def test_runtime_code_runs_on_python_3_8():
    """Bastion hosts run old distributions: vermin proves the floor."""
    files = [os.path.join(ROOT, name) for name in ('tylserver.py', 'tylstore.py', 'backends')]
    vermin = 'import sys; from vermin.main import main; sys.exit(main())'
    result = subprocess.run([sys.executable, '-c', vermin, '--no-tips', '--violations',
                             '--eval-annotations', '-t=3.8-'] + files,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_config_given_after_the_command_is_told_where_it_goes(tmp_path):
    result = run_tylserver('envs', '--config', write_config(tmp_path))
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1].endswith(
        '(--config goes before the command: tylserver.py --config FILE COMMAND)')
