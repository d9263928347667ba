#!/usr/bin/env python3
"""TYL: a Terraform/OpenTofu `backend "http"` state server.

Terraform keeps its state here with GET and POST and guards every write
with the custom verbs LOCK and UNLOCK.  Each environment (`?env=NAME`) has
its own backend instance, a subclass of `tylstore.TYLPersistent` loaded
from `BACKEND_CLASS`; the embedded default stores files on disk.

The file reads top to bottom: configuration, plugin loading, environments
and the protocol rules, the HTTP handler, the server, the command line.
"""

import argparse
import base64
import contextlib
import hashlib
import http.server
import importlib
import json
import logging
import os
import re
import signal
import socket
import socketserver
import ssl
import sys
import threading
import time
from collections import defaultdict, namedtuple
from urllib.parse import parse_qs, urlsplit

import yaml

import tylstore

__version__ = tylstore.__version__

log = logging.getLogger('tyl')

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CONFIG_PATH = os.path.join(HERE, 'config.yaml')
BUILTIN_BACKENDS_PATH = os.path.join(HERE, 'backends')


# --------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------

class ConfigError(Exception):
    """A configuration problem, told in one line that names the key."""


def _check_int(low, high=None):
    def check(key, value):
        if isinstance(value, bool) or not isinstance(value, int) or value < low \
                or (high is not None and value > high):
            upper = 'to %d' % high if high is not None else 'or more'
            raise ConfigError('%s must be a whole number from %d %s, not %r' % (key, low, upper, value))
        return value
    return check


def _check_seconds(key, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigError('%s must be a number of seconds above 0, not %r' % (key, value))
    return value


def _check_bool(key, value):
    if not isinstance(value, bool):
        raise ConfigError('%s must be true or false, not %r' % (key, value))
    return value


def _check_string(key, value):
    if not isinstance(value, str) or not value:
        raise ConfigError('%s must be a non-empty string, not %r' % (key, value))
    return value


def _check_class_name(key, value):
    if not isinstance(value, str) or not re.fullmatch(r'[A-Za-z_][\w.]*\.[A-Za-z_]\w*', value):
        raise ConfigError('%s must name a class as module.Class, not %r' % (key, value))
    return value


def _check_list_of(check_item):
    """Accept one item or a list of them (PyTerraBackTYL accepted both)."""
    def check(key, value):
        if value is None:
            return []
        items = value if isinstance(value, list) else [value]
        return [check_item(key, item) for item in items]
    return check


def _check_optional(check):
    """Accept an unset key (null or an empty string) as None."""
    def checked(key, value):
        return None if value is None or value == '' else check(key, value)
    return checked


def _check_format(key, value):
    """A str.format template of LockInfo fields, as '{Who} {ID}': checked
    now, with every field empty, rather than failing at each lock."""
    try:
        _check_string(key, value).format_map(defaultdict(str))
    except (ValueError, LookupError, AttributeError) as error:
        raise ConfigError('%s is not a valid template of {LockInfo fields}: %s' % (key, error))
    return value


def _check_file_name(key, value):
    if not isinstance(value, str) or value in ('', '.', '..') or '/' in value or '\0' in value:
        raise ConfigError('%s must be a file name, without "/", not %r' % (key, value))
    return value


def _check_log_level(key, value):
    levels = ('DEBUG', 'INFO', 'WARNING', 'ERROR', 'CRITICAL')
    if not isinstance(value, str) or value.upper() not in levels:
        raise ConfigError('%s must be one of %s, not %r' % (key, ', '.join(levels), value))
    return value.upper()


def _check_string_map(key, value):
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise ConfigError('%s must map names to strings, not %r' % (key, value))
    return value


# key: (default, check).  config.yaml repeats every default with a comment;
# a test keeps the two equal.
CONFIG_KEYS = {
    'BACKEND_SERVICE_IP': ('127.0.0.1', _check_string),
    'BACKEND_SERVICE_PORT': (2442, _check_int(0, 65535)),
    'BACKEND_PLUGINS_PATH': ('backends', _check_list_of(_check_string)),
    'BACKEND_CLASS': ('file_backend.FileBackend', _check_class_name),
    'POST_PROCESS_CLASSES': ([], _check_list_of(_check_class_name)),
    'LOG_LEVEL': ('INFO', _check_log_level),
    'USE_SSL': (False, _check_bool),
    'SSL_PUBLIC_KEY': ('ssl/public.key', _check_string),
    'SSL_PRIVATE_KEY': ('ssl/private.key', _check_string),
    'HELPER_HOSTNAME_QUERY_MAP': ({}, _check_string_map),
    'FILE_DATA_PATH': ('data', _check_string),
    'SQLITE_DB_PATH': ('tyl.sqlite3', _check_string),
    'PYSHELVE_DATA_PATH': ('data', _check_string),
    'PYSHELVE_DB_FILE_NAME': ('_terraform_state', _check_string),
    'AES_SECRET_KEY': (None, _check_optional(_check_string)),
    'AES_KEY_FILE': (None, _check_optional(_check_string)),
    'AES_OLD_KEYS': ([], _check_list_of(_check_string)),
    'AES_OLD_KEY_FILES': ([], _check_list_of(_check_string)),
    'GIT_REPOSITORY': (None, _check_optional(_check_string)),
    'GIT_WORKING_PATH': ('tyl.git', _check_string),
    'GIT_DEFAULT_CLONE_BRANCH': ('master', _check_string),
    'GIT_USER_NAME': ('TYL', _check_string),
    'GIT_USER_EMAIL': ('tyl@localhost', _check_string),
    'GIT_COMMIT_MESSAGE_FORMAT': ('{Who}, {Operation} - {ID}', _check_format),
    'GIT_STATE_CHANGE_LOG_FILENAME': ('state_change.log', _check_file_name),
    'GIT_STATE_CHANGE_LOG_FORMAT': ('{Created} - {Operation}: {Who} {ID}', _check_format),
    'GIT_STATE_CHANGE_LOG_SCROLLBACK': (300, _check_int(1)),
    'MAX_BODY_BYTES': (256 * 1024 * 1024, _check_int(1)),
    'FORCE_UNLOCK': (True, _check_bool),
    'REQUEST_TIMEOUT': (60, _check_seconds),
    'MAX_CONNECTIONS': (200, _check_int(1)),
}

# Keys holding a path, resolved against the directory of the config file.
PATH_KEYS = ('BACKEND_PLUGINS_PATH', 'SSL_PUBLIC_KEY', 'SSL_PRIVATE_KEY', 'FILE_DATA_PATH',
             'SQLITE_DB_PATH', 'PYSHELVE_DATA_PATH', 'AES_KEY_FILE', 'AES_OLD_KEY_FILES',
             'GIT_WORKING_PATH')

ENVIRONMENT_OVERRIDE = re.compile(r'TYL_([A-Z][A-Z0-9_]*)')


def _one_line(text):
    return ' '.join(str(text).split())


def load_config(path=None, environ=None):
    """Build the constants class `C` from config.yaml and `TYL_<KEY>` variables.

    Known keys are checked and get their defaults; every other key passes
    through untouched, for plugins to read.  Without an explicit `path`,
    config.yaml beside this program is used when it exists.
    """
    environ = os.environ if environ is None else environ
    if path is None and not os.path.exists(DEFAULT_CONFIG_PATH):
        settings, base = {}, os.getcwd()
    else:
        path = path or DEFAULT_CONFIG_PATH
        settings, base = _read_yaml_file(path), os.path.dirname(os.path.abspath(path))
    for name, text in environ.items():
        override = ENVIRONMENT_OVERRIDE.fullmatch(name)
        if override:
            try:
                settings[override.group(1)] = yaml.safe_load(text)
            except yaml.YAMLError as error:
                raise ConfigError('%s is not a valid YAML value: %s' % (name, _one_line(error)))
    for key, (default, check) in CONFIG_KEYS.items():
        settings[key] = check(key, settings.get(key, default))
    for key in PATH_KEYS:
        settings[key] = _resolve_path(base, settings[key])
    settings['CONFIG_DIR'] = base
    return type('C', (tylstore.C,), settings)


def _resolve_path(base, value):
    """A path key's value, relative to `base`: one path, a list of them,
    or None for an optional key left unset."""
    if value is None:
        return None
    if isinstance(value, list):
        return [_resolve_path(base, item) for item in value]
    return os.path.join(base, os.path.expanduser(value))


def _read_yaml_file(path):
    try:
        with open(path, encoding='utf-8') as stream:
            loaded = yaml.safe_load(stream)
    except OSError as error:
        raise ConfigError('cannot read config file %s: %s' % (path, error.strerror))
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise ConfigError('config file %s is not valid YAML: %s' % (path, _one_line(error)))
    if loaded is None:
        return {}
    if not isinstance(loaded, dict) or not all(isinstance(key, str) for key in loaded):
        raise ConfigError('config file %s must be a mapping of KEY: value' % path)
    return loaded


# --------------------------------------------------------------------------
# Plugins
# --------------------------------------------------------------------------

Plugins = namedtuple('Plugins', 'constants backend_class post_process_classes')


def load_plugins(constants):
    """Load BACKEND_CLASS and POST_PROCESS_CLASSES, checked against the contract."""
    # Plugins written for PyTerraBackTYL import the contract by its old name.
    sys.modules.setdefault('abc_tylstore', tylstore)
    for directory in reversed([BUILTIN_BACKENDS_PATH] + constants.BACKEND_PLUGINS_PATH):
        if directory not in sys.path:
            sys.path.insert(0, directory)
    backend_class = _load_class('BACKEND_CLASS', constants.BACKEND_CLASS, tylstore.TYLPersistent)
    post_process_classes = [_load_class('POST_PROCESS_CLASSES', name, tylstore.TYLNonpersistent)
                            for name in constants.POST_PROCESS_CLASSES]
    return Plugins(constants, backend_class, post_process_classes)


def _load_class(key, dotted_name, base):
    module_name, _, class_name = dotted_name.rpartition('.')
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ConfigError('%s: cannot load module %s: %s' % (key, module_name, _one_line(error)))
    except Exception as error:
        raise ConfigError('%s: module %s failed to import: %s: %s'
                          % (key, module_name, type(error).__name__, _one_line(error)))
    cls = getattr(module, class_name, None)
    if not isinstance(cls, type):
        raise ConfigError('%s: module %s has no class %s' % (key, module_name, class_name))
    if not issubclass(cls, base):
        raise ConfigError('%s: %s is not a subclass of %s' % (key, dotted_name, base.__name__))
    if cls.__abstractmethods__:
        raise ConfigError('%s: %s does not implement %s'
                          % (key, dotted_name, ', '.join(sorted(cls.__abstractmethods__))))
    return cls


# --------------------------------------------------------------------------
# Environments and the protocol rules
# --------------------------------------------------------------------------

ENVIRONMENT_NAME = re.compile(r'[A-Za-z0-9][A-Za-z0-9._-]{0,127}')

Reply = namedtuple('Reply', 'status body content_type')
JSON = 'application/json'
TEXT = 'text/plain; charset=utf-8'


class Refusal(Exception):
    """A request refused for a reason the client can fix: a 4xx, one line."""

    def __init__(self, status, reason, close=False, headers=()):
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.close = close
        self.headers = headers


def text_reply(status, reason):
    return Reply(status, (reason + '\n').encode('utf-8'), TEXT)


def lock_bytes(lock):
    """A stored lock as bytes: byte for byte as its holder sent it, when
    the backend kept the text."""
    if isinstance(lock, str):
        return lock.encode('utf-8')
    if isinstance(lock, bytes):
        return lock
    return json.dumps(lock, separators=(',', ':')).encode('utf-8')


def lock_reply(status, lock):
    return Reply(status, lock_bytes(lock), JSON)


def _reject_constant(name):
    raise ValueError('%s is not valid JSON' % name)


def parse_json_object(body, what):
    """(object, text) of a JSON object body, or a 400 Refusal."""
    try:
        text = body.decode('utf-8')
        value = json.loads(text, parse_constant=_reject_constant)
    except UnicodeDecodeError:
        raise Refusal(400, '%s is not UTF-8' % what)
    except ValueError as error:
        raise Refusal(400, '%s is not valid JSON: %s' % (what, error))
    if not isinstance(value, dict):
        raise Refusal(400, '%s must be a JSON object, not %s' % (what, type(value).__name__))
    return value, text


def _keep_top_level_pairs(found):
    """An object_pairs_hook that builds nothing: each object becomes None,
    and the pairs of the last one seen, the outermost, are kept."""
    def hook(pairs):
        found[:] = pairs
    return hook


def inspect_state(body):
    """Check a state body without building it; return its top-level fields.

    The body must be a UTF-8 JSON object without NaN or Infinity literals,
    else a 400 Refusal.  Nested objects are parsed and dropped one by one,
    so a 50 MB state costs no object tree; the returned dict holds the
    top-level scalars (`version`, `serial`, `lineage`...), nested objects
    as None.
    """
    if not body.lstrip()[:1] == b'{':
        parse_json_object(body, 'state')  # refuses with the precise reason
    found = []
    decoder = json.JSONDecoder(object_pairs_hook=_keep_top_level_pairs(found),
                               parse_constant=_reject_constant)
    try:
        decoder.decode(body.decode('utf-8'))
    except UnicodeDecodeError:
        raise Refusal(400, 'state is not UTF-8')
    except ValueError as error:
        raise Refusal(400, 'state is not valid JSON: %s' % error)
    return dict(found)


def _version_metadata(body, top, holder):
    """What a backend keeping history records of an accepted write."""
    holder = tylstore.lock_info(holder)
    return {
        'serial': top.get('serial'),
        'lineage': top.get('lineage'),
        'size': len(body),
        'sha256': hashlib.sha256(body).hexdigest(),
        'created': time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()),
        'lock_id': holder.get('ID'),
        'who': holder.get('Who'),
    }


def parse_lock_info(body):
    info, text = parse_json_object(body, 'lock info')
    if not isinstance(info.get('ID'), str) or not info['ID']:
        raise Refusal(400, 'lock info needs a non-empty string "ID"')
    return info, text


class Environment(object):
    """One environment: its backend, its post-processors, and its mutex.

    Every call into the backend happens under `mutex`, so plugins need not
    be thread-safe and requests for one environment are applied one at a
    time.  The backend's stored lock is the only truth about the lock: each
    rule asks the backend afresh, so a second server process on the same
    storage, or a restart, is seen at once.
    """

    def __init__(self, name, plugins):
        self.name = name
        self.plugins = plugins
        self.mutex = threading.Lock()
        self._backend = None
        self.post_processors = []
        self.post_processor_failures = []

    @property
    def backend(self):
        """The backend instance, created on first use (call under `mutex`).

        Post-processors are created with it; one that fails to start is
        logged and left out, since notifications never fail a request.
        """
        if self._backend is None:
            constants = self.plugins.constants
            backend = self.plugins.backend_class(self.name, constants)
            for cls in self.plugins.post_process_classes:
                try:
                    self.post_processors.append(cls(self.name, constants))
                except Exception as error:
                    log.exception('post-processor %s failed to start for env %s',
                                  cls.__name__, self.name)
                    self.post_processor_failures.append({
                        'post_processor_module': cls.__name__,
                        'num_errors_logged': 1,
                        'recent_logged_error': 'failed to start: %s: %s' % (
                            type(error).__name__, _one_line(error)),
                    })
            self._backend = backend
        return self._backend

    def notify(self, method_name, obj, text):
        """Hand an accepted change to each post-processor; never fail because of one."""
        for processor in self.post_processors:
            try:
                getattr(processor, method_name)(obj, raw=text)
            except Exception as error:
                processor._logged_errors_ += 1
                processor._recent_error_ = '%s: %s' % (type(error).__name__, error)
                log.exception('post-processor %s failed on %s for env %s',
                              type(processor).__name__, method_name, self.name)

    def read(self):
        with self.mutex:
            state = self.backend.get_tfstate()
        if not state:
            return Reply(204, b'', None)
        if isinstance(state, str):
            state = state.encode('utf-8')
        elif not isinstance(state, bytes):
            state = json.dumps(state, indent=2).encode('utf-8')
        return Reply(200, state, JSON)

    def write(self, body, lock_id):
        """Store a state; `lock_id` is the request's `?ID=`, or None.

        The state is unpacked only for those who need the object: plugins
        that do not store raw bytes, and post-processors.
        """
        top = inspect_state(body)
        with self.mutex:
            backend = self.backend
            holder = backend.get_lock_state()
            if holder and lock_id != tylstore.lock_id(holder):
                return lock_reply(423, holder)
            if not holder and lock_id is not None:
                return text_reply(409, 'lock %s is not held: the lock was released or '
                                       'force-unlocked; nothing was stored' % lock_id)
            state = text = None
            if self.post_processors or not self.plugins.backend_class.RAW_BYTES:
                state, text = parse_json_object(body, 'state')
            if self.plugins.backend_class.RAW_BYTES:
                backend.store_tfstate(state, raw_bytes=body,
                                      metadata=_version_metadata(body, top, holder))
            else:
                backend.store_tfstate(state, raw=text)
            self.notify('process_tfstate', state, text)
        return Reply(200, b'', None)

    def lock(self, body):
        info, text = parse_lock_info(body)
        with self.mutex:
            backend = self.backend
            holder = backend.get_lock_state()
            if holder:
                # The same ID again is a client's retry after a lost reply.
                return lock_reply(200 if tylstore.lock_id(holder) == info['ID'] else 423, holder)
            if not backend.set_locked(info, raw=text, **self._raw_bytes(body)):
                holder = backend.get_lock_state()
                if holder:
                    return lock_reply(423, holder)
                return text_reply(423, 'the lock was taken and released meanwhile; try again')
            self.notify('on_locked', info, text)
        return lock_reply(200, body)

    def unlock(self, body):
        """Release the lock.  An empty body is Terraform's force-unlock."""
        if not body.strip():
            return self.force_unlock()
        info, text = parse_lock_info(body)
        with self.mutex:
            backend = self.backend
            holder = backend.get_lock_state()
            if not holder:
                return Reply(200, b'', None)
            if tylstore.lock_id(holder) != info['ID']:
                return lock_reply(409, holder)
            backend.set_unlocked(info, raw=text, **self._raw_bytes(body))
            self.notify('on_unlocked', info, text)
        return Reply(200, b'', None)

    def force_unlock(self):
        if not self.plugins.constants.FORCE_UNLOCK:
            raise Refusal(403, 'force-unlock is disabled on this server (FORCE_UNLOCK: false)')
        with self.mutex:
            backend = self.backend
            holder = backend.get_lock_state()
            if holder:
                backend.set_unlocked({}, raw='{}', **self._raw_bytes(b'{}'))
                log.warning('force-unlock of env %s released lock %s', self.name,
                            _printable(lock_bytes(holder).decode('utf-8', 'replace')))
                self.notify('on_unlocked', {}, '{}')
        return Reply(200, b'', None)

    def delete(self, lock_id):
        if not self.plugins.backend_class.supports('delete_tfstate'):
            raise Refusal(405, '%s cannot delete state' % self.plugins.backend_class.__name__,
                          headers=[('Allow', 'GET, POST, PUT, LOCK, UNLOCK')])
        with self.mutex:
            backend = self.backend
            holder = backend.get_lock_state()
            if holder and lock_id != tylstore.lock_id(holder):
                return lock_reply(409, holder)
            backend.delete_tfstate()
        return Reply(200, b'', None)

    def status(self):
        with self.mutex:
            backend = self.backend
            locked = bool(backend.get_lock_state())
            lock_state = tylstore.C.LOCK_STATE_LOCKED if locked else tylstore.C.LOCK_STATE_UNLOCKED
            return {
                'environment_name': self.name,
                'lock_state': lock_state,
                'http_state': tylstore.C.LOCK_STATES[lock_state],
                'backend_status': backend.backend_status(),
                'post_processors': [{
                    'post_processor_module': type(p).__name__,
                    'num_errors_logged': p._logged_errors_,
                    'recent_logged_error': p._recent_error_,
                    'post_processor_status': p.post_processor_status(),
                } for p in self.post_processors] + self.post_processor_failures,
            }

    def _raw_bytes(self, body):
        """The exact bytes, for backends that declare they store them."""
        return {'raw_bytes': body} if self.plugins.backend_class.RAW_BYTES else {}


class Environments(object):
    """The lock-guarded map of environment name to `Environment`.

    The map's own lock is held only to find or add an entry, never while a
    backend works, so environments never wait on each other.
    """

    def __init__(self, plugins):
        self.plugins = plugins
        self._lock = threading.Lock()
        self._environments = {}

    def __getitem__(self, name):
        with self._lock:
            environment = self._environments.get(name)
            if environment is None:
                environment = self._environments[name] = Environment(name, self.plugins)
            return environment

    def snapshot(self):
        with self._lock:
            return sorted(self._environments.items())


# --------------------------------------------------------------------------
# The HTTP handler
# --------------------------------------------------------------------------

def _printable(text):
    """`text` safe for one log line: control characters and quotes escaped."""
    return json.dumps(text)[1:-1]


CHUNK_SIZE_LINE = re.compile(rb'([0-9A-Fa-f]{1,16})(;[^\r\n]*)?\r?\n')
MAX_TRAILER_LINES = 64


class TYLRequestHandler(http.server.BaseHTTPRequestHandler):
    """One connection; each request is routed by path and method.

    The path selects the resource and the method the action on it, as
    PyTerraBackTYL's URLs and Terraform's configurable methods require:
    a state write may come as POST or PUT, a lock as LOCK or POST, an
    unlock as UNLOCK or DELETE.
    """

    protocol_version = 'HTTP/1.1'
    # Headers and body leave in two writes; with Nagle's algorithm the body
    # would wait for the client's delayed ACK, some 40 ms per request.
    disable_nagle_algorithm = True
    # Buffer replies, so headers and a small body leave in one send();
    # http.server flushes after every request.
    wbufsize = 64 * 1024
    # Error replies to unparsable request lines still get a status line.
    default_request_version = 'HTTP/1.0'
    server_version = 'TYL/' + __version__

    ROUTES = {
        '/': {'GET': 'read_state', 'POST': 'write_state', 'PUT': 'write_state',
              'DELETE': 'delete_state', 'LOCK': 'lock', 'UNLOCK': 'unlock'},
        '/lock': {'LOCK': 'lock', 'POST': 'lock', 'UNLOCK': 'unlock', 'DELETE': 'unlock'},
        '/unlock': {'UNLOCK': 'unlock', 'DELETE': 'unlock'},
        '/state': {'GET': 'show_status'},
    }
    ALL_METHODS = 'GET, POST, PUT, DELETE, LOCK, UNLOCK'

    # Set per request; these defaults cover requests refused before parsing.
    path = ''
    environment_name = None
    lock_id = None

    def setup(self):
        constants = self.server.constants
        self.timeout = constants.REQUEST_TIMEOUT
        if self.server.ssl_context is not None:
            self.request.settimeout(self.timeout)
            self.request = self.server.ssl_context.wrap_socket(self.request, server_side=True)
        super().setup()

    def dispatch(self):
        """Answer one request: read its body, route it, reply, log it."""
        started = time.monotonic()
        self.environment_name = self.lock_id = None
        with self.server.request_in_flight():
            try:
                body = self.read_body()
                url = urlsplit(self.path)
                actions = self.ROUTES.get(url.path)
                if actions is None:
                    raise Refusal(404, 'no such path: %s' % url.path)
                action = actions.get(self.command)
                if action is None:
                    raise Refusal(405, '%s is not allowed on %s' % (self.command, url.path),
                                  headers=[('Allow', ', '.join(actions))])
                self.query = self.parse_query(url.query)
                reply = getattr(self, action)(body)
                headers = []
                if action == 'read_state' and reply.status == 200:
                    headers.append(('Content-MD5', _content_md5(reply.body)))
            except Refusal as refusal:
                reply, headers = text_reply(refusal.status, refusal.reason), refusal.headers
                self.close_connection = self.close_connection or refusal.close
            except Exception as error:
                log.exception('backend error on %s %s', self.command, _printable(self.path))
                reply, headers = text_reply(500, '%s: %s' % (type(error).__name__, _one_line(error))), []
                self.close_connection = True
            if self.server.stopping:
                self.close_connection = True
            self.send_reply(reply, headers)
        self.log_access(reply, started)

    do_GET = do_POST = do_PUT = do_DELETE = do_LOCK = do_UNLOCK = dispatch

    def __getattr__(self, name):
        # http.server answers an unknown method with 501; Terraform would not
        # retry it either, but 405 with Allow is what the method really is.
        if name.startswith('do_'):
            return self.reply_method_not_allowed
        raise AttributeError(name)

    def reply_method_not_allowed(self):
        """Any method but ours; its body is not read, so the connection closes."""
        reply = text_reply(405, 'method %s is not allowed' % _printable(self.command)[:32])
        self.close_connection = True
        self.send_reply(reply, [('Allow', self.ALL_METHODS)])
        self.log_access(reply, time.monotonic())

    def parse_request(self):
        """http.server's parsing, less HTTP/0.9: a request line without a
        version would get an answer without a status line or headers."""
        if not super().parse_request():
            return False
        if len(self.requestline.split()) != 3:
            self.send_error(400, 'request line needs a method, a path and an HTTP version')
            return False
        return True

    # -- the actions --------------------------------------------------------

    def read_state(self, body):
        return self.environment().read()

    def write_state(self, body):
        self.lock_id = self.query_value('ID')
        return self.environment().write(body, self.lock_id)

    def delete_state(self, body):
        self.lock_id = self.query_value('ID')
        return self.environment().delete(self.lock_id)

    def lock(self, body):
        self.lock_id = _lock_id_of_body(body)
        return self.environment().lock(body)

    def unlock(self, body):
        self.lock_id = _lock_id_of_body(body) or 'force'
        return self.environment().unlock(body)

    def show_status(self, body):
        constants = self.server.constants
        status = {
            'backend_module': constants.BACKEND_CLASS,
            'post_processor_modules': constants.POST_PROCESS_CLASSES,
            'environments': [_status_or_error(env) for _, env in self.server.environments.snapshot()],
        }
        return Reply(200, json.dumps(status, indent=2).encode('utf-8'), JSON)

    # -- request parsing ----------------------------------------------------

    def parse_query(self, query):
        """The query parameters; a name given twice is refused, wherever it
        is used, so no two parts of the server can read different values."""
        try:
            query = parse_qs(query, keep_blank_values=True, max_num_fields=32)
        except ValueError as error:
            raise Refusal(400, 'bad query string: %s' % error)
        for name, values in query.items():
            if len(values) > 1:
                raise Refusal(400, 'query parameter %s is given %d times'
                              % (_printable(name)[:64], len(values)))
        return query

    def query_value(self, name):
        """The value of query parameter `name`, or None when absent."""
        return self.query.get(name, [None])[0]

    def environment(self):
        name = self.query_value('env')
        if name is None:
            raise Refusal(400, 'missing ?env=NAME')
        if not ENVIRONMENT_NAME.fullmatch(name):
            raise Refusal(400, 'bad environment name %s: use 1 to 128 of A-Z a-z 0-9 . _ -, '
                               'starting with a letter or digit' % _printable(name)[:140])
        self.environment_name = name
        return self.server.environments[name]

    def read_body(self):
        """The request body, by Content-Length or chunked, within MAX_BODY_BYTES.

        A malformed or oversized body leaves unread bytes on the wire, so
        the connection is closed after the refusal.
        """
        length = self.headers.get_all('Content-Length', [])
        encoding = self.headers.get_all('Transfer-Encoding', [])
        if encoding and length:
            raise Refusal(400, 'both Content-Length and Transfer-Encoding given', close=True)
        if encoding and [e.strip().lower() for e in encoding] != ['chunked']:
            raise Refusal(400, 'unsupported Transfer-Encoding %s' % _printable(', '.join(encoding)),
                          close=True)
        try:
            if encoding:
                body = self.read_chunked_body()
            elif length:
                body = self.read_sized_body(length)
            else:
                body = b''
        except socket.timeout:
            raise Refusal(408, 'no body data for %s seconds' % self.timeout, close=True)
        self.check_content_md5(body)
        return body

    def read_sized_body(self, length):
        if len(length) > 1 or not re.fullmatch(r'[0-9]{1,20}', length[0].strip()):
            raise Refusal(400, 'bad Content-Length', close=True)
        size = int(length[0])
        if size > self.server.constants.MAX_BODY_BYTES:
            raise Refusal(413, 'body of %d bytes is over MAX_BODY_BYTES (%d)'
                          % (size, self.server.constants.MAX_BODY_BYTES), close=True)
        body = self.rfile.read(size)
        if len(body) != size:
            raise Refusal(400, 'body ended after %d of %d bytes' % (len(body), size), close=True)
        return body

    def read_chunked_body(self):
        limit = self.server.constants.MAX_BODY_BYTES
        chunks, total = [], 0
        while True:
            found = CHUNK_SIZE_LINE.fullmatch(self.rfile.readline(1024))
            if not found:
                raise Refusal(400, 'malformed chunked body', close=True)
            size = int(found.group(1), 16)
            if size == 0:
                break
            total += size
            if total > limit:
                raise Refusal(413, 'body is over MAX_BODY_BYTES (%d)' % limit, close=True)
            chunk = self.rfile.read(size)
            if len(chunk) != size or self.rfile.readline(3) not in (b'\r\n', b'\n'):
                raise Refusal(400, 'malformed chunked body', close=True)
            chunks.append(chunk)
        for _ in range(MAX_TRAILER_LINES):
            line = self.rfile.readline(8192)
            if line in (b'\r\n', b'\n'):
                return b''.join(chunks)
            if not line.endswith(b'\n'):
                break
        raise Refusal(400, 'malformed chunked body trailer', close=True)

    def check_content_md5(self, body):
        claimed = self.headers.get('Content-MD5')
        if claimed is None:
            return
        try:
            digest = base64.b64decode(claimed.strip(), validate=True)
        except ValueError:
            raise Refusal(400, 'Content-MD5 is not base64')
        if digest != hashlib.md5(body).digest():
            raise Refusal(400, 'Content-MD5 does not match the body')

    # -- responses and logging ----------------------------------------------

    def send_reply(self, reply, headers=()):
        self.send_response(reply.status)
        if reply.content_type:
            self.send_header('Content-Type', reply.content_type)
        self.send_header('Content-Length', str(len(reply.body)))
        for name, value in headers:
            self.send_header(name, value)
        if self.close_connection:
            self.send_header('Connection', 'close')
        self.end_headers()
        self.wfile.write(reply.body)

    def send_error(self, code, message=None, explain=None):
        """Errors found by http.server itself (bad request line, headers too
        large): one plain line like every other refusal, then close."""
        self.close_connection = True
        reply = text_reply(code, message or self.responses.get(code, ('error',))[0])
        self.send_reply(reply)
        self.log_access(reply, time.monotonic())

    def log_access(self, reply, started):
        log.info('%s "%s %s" env=%s status=%d bytes=%d ms=%.1f lock=%s',
                 self.client_address[0], _printable(str(self.command)), _printable(str(self.path)),
                 self.environment_name or '-', reply.status, len(reply.body),
                 (time.monotonic() - started) * 1000, _printable(self.lock_id or '-'))

    def log_request(self, code='-', size='-'):
        """Replaced by `log_access`, which knows the environment and timing."""

    def log_message(self, format, *args):
        log.warning('%s %s', self.client_address[0], _printable(format % args))


def _status_or_error(environment):
    """One environment's status; a failing backend shows its error, so that
    one broken environment does not hide the others."""
    try:
        return environment.status()
    except Exception as error:
        return {'environment_name': environment.name,
                'error': '%s: %s' % (type(error).__name__, _one_line(error))}


def _content_md5(body):
    return base64.b64encode(hashlib.md5(body).digest()).decode('ascii')


def _lock_id_of_body(body):
    return tylstore.lock_id(body) if body.strip() else None


# --------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------

class TYLServer(http.server.ThreadingHTTPServer):
    """A thread per connection, at most MAX_CONNECTIONS at once.

    A connection over the limit gets an immediate 503 (Terraform retries
    5xx), so a flood of idle sockets cannot make the server spawn threads
    without end.
    """

    daemon_threads = True
    request_queue_size = 128

    def __init__(self, plugins):
        constants = plugins.constants
        self.constants = constants
        self.environments = Environments(plugins)
        self.ssl_context = _ssl_context(constants) if constants.USE_SSL else None
        self.connection_slots = threading.BoundedSemaphore(constants.MAX_CONNECTIONS)
        self.stopping = False
        self._in_flight = 0
        self._idle = threading.Condition()
        host = constants.BACKEND_SERVICE_IP
        self.address_family = socket.AF_INET6 if ':' in host else socket.AF_INET
        super().__init__((host, constants.BACKEND_SERVICE_PORT), TYLRequestHandler)

    def server_bind(self):
        # HTTPServer.server_bind looks the host name up in DNS; a bastion
        # without DNS would stall at start-up, and nothing here needs it.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    @property
    def url(self):
        host = self.server_name if self.address_family == socket.AF_INET else '[%s]' % self.server_name
        return '%s://%s:%d/' % ('https' if self.ssl_context else 'http', host, self.server_port)

    def process_request(self, request, client_address):
        if not self.connection_slots.acquire(blocking=False):
            _refuse_connection(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.connection_slots.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.connection_slots.release()

    def handle_error(self, request, client_address):
        """A connection ended by an error outside any request's answer, most
        often a client that went away: one log line, not a traceback on stderr."""
        error = sys.exc_info()[1]
        log.warning('%s connection ended: %s: %s', client_address[0], type(error).__name__,
                    _printable(str(error)))

    @contextlib.contextmanager
    def request_in_flight(self):
        with self._idle:
            self._in_flight += 1
        try:
            yield
        finally:
            with self._idle:
                self._in_flight -= 1
                self._idle.notify_all()

    def wait_for_requests(self, timeout):
        """Wait until no request is being answered; False on timeout."""
        with self._idle:
            return self._idle.wait_for(lambda: self._in_flight == 0, timeout)


OVER_CAPACITY = (b'HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n'
                 b'Content-Length: 34\r\nRetry-After: 1\r\nConnection: close\r\n\r\n'
                 b'too many connections, retry later\n')


def _refuse_connection(sock):
    try:
        sock.setblocking(False)
        sock.send(OVER_CAPACITY)
    except OSError:
        pass
    finally:
        sock.close()


def _ssl_context(constants):
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(constants.SSL_PUBLIC_KEY, constants.SSL_PRIVATE_KEY)
    except (OSError, ssl.SSLError) as error:
        raise ConfigError('SSL_PUBLIC_KEY/SSL_PRIVATE_KEY: cannot load %s and %s: %s'
                          % (constants.SSL_PUBLIC_KEY, constants.SSL_PRIVATE_KEY, error))
    return context


def serve(server, shutdown_timeout=10):
    """Serve until SIGTERM or SIGINT, then let requests under way finish."""
    def request_stop(signum, frame):
        log.info('signal %d: stopping', signum)
        server.stopping = True
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    server.serve_forever(poll_interval=0.2)
    server.server_close()
    if not server.wait_for_requests(shutdown_timeout):
        log.warning('stopped with requests still under way after %d s', shutdown_timeout)
    log.info('stopped')


# --------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(prog='tylserver', description=__doc__.split('\n')[0])
    parser.add_argument('--config', help='config file (default: config.yaml beside tylserver.py)')
    parser.add_argument('--check-config', action='store_true',
                        help='load the config and the plugins, report, and exit')
    parser.add_argument('--version', action='version', version='TYL ' + __version__)
    args = parser.parse_args(argv)
    try:
        constants = load_config(args.config)
        logging.basicConfig(level=constants.LOG_LEVEL, stream=sys.stderr,
                            format='%(asctime)s %(levelname)s %(message)s')
        plugins = load_plugins(constants)
        if args.check_config:
            print('config OK: backend %s, post-processors [%s], listening address %s:%d'
                  % (constants.BACKEND_CLASS, ', '.join(constants.POST_PROCESS_CLASSES),
                     constants.BACKEND_SERVICE_IP, constants.BACKEND_SERVICE_PORT))
            return 0
        server = TYLServer(plugins)
    except ConfigError as error:
        print('tylserver: error: %s' % error, file=sys.stderr)
        return 2
    except OSError as error:
        print('tylserver: error: cannot listen on %s:%s: %s' % (
            constants.BACKEND_SERVICE_IP, constants.BACKEND_SERVICE_PORT, error.strerror),
            file=sys.stderr)
        return 2
    print('TYL %s listening on %s with %s' % (__version__, server.url, constants.BACKEND_CLASS),
          file=sys.stderr, flush=True)
    serve(server)
    return 0


if __name__ == '__main__':
    sys.exit(main())
