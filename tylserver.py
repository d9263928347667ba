#!/usr/bin/env python3
"""TYL: a Terraform/OpenTofu `backend "http"` state server.

Terraform keeps its state here with GET and POST and guards every write
with the custom verbs LOCK and UNLOCK.  Each environment (`?env=NAME`) has
its own backend instance, a subclass of `tylstore.TYLPersistent` loaded
from `BACKEND_CLASS`; the embedded default stores files on disk.

The file reads top to bottom: configuration, plugin loading, environments
and the protocol rules, authentication, the dashboard's pages, the HTTP
handler, the server, the command line.
"""

import argparse
import base64
import contextlib
import datetime
import fnmatch
import functools
import getpass
import hashlib
import hmac
import html
import http.server
import importlib
import ipaddress
import json
import logging
import math
import os
import re
import signal
import socket
import socketserver
import ssl
import sys
import tempfile
import threading
import time
import uuid
from collections import OrderedDict, defaultdict, namedtuple
from urllib.parse import parse_qs, urlencode, urlsplit

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


# The longest wait a key may set; an infinite one would overflow the clock.
MAX_SECONDS = 24 * 3600


def _check_seconds(key, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= MAX_SECONDS:
        raise ConfigError('%s must be a number of seconds above 0, up to %d, not %r'
                          % (key, MAX_SECONDS, value))
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


def _check_url(key, value):
    """An http(s) URL, checked now rather than failing at each delivery.
    The value is not echoed: a Slack webhook URL is a secret."""
    try:
        valid = isinstance(value, str) and re.fullmatch(r'https?://\S+', value, re.IGNORECASE) \
            and urlsplit(value).hostname
    except ValueError:  # as an unclosed [IPv6 address]
        valid = False
    if not valid:
        raise ConfigError('%s must be an http:// or https:// URL' % key)
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


USER_NAME = re.compile(r'[^\s:@][^\s:]{0,127}')
ACCESS_LEVELS = ('read', 'write', 'admin')


def _check_user_name(key, name):
    if not isinstance(name, str) or not USER_NAME.fullmatch(name) or not name.isprintable():
        raise ConfigError('%s: %r is not a user name: 1 to 128 printable characters without '
                          'spaces or ":", not starting with "@"' % (key, name))
    return name


def _check_member(key, name):
    """A user name, or @group."""
    if isinstance(name, str) and name.startswith('@'):
        _check_user_name(key, name[1:])
        return name
    return _check_user_name(key, name)


def _check_password_hashes(key, value):
    """User -> password hash.  The message never quotes a value: a plain-text
    password put there by mistake must not reach a terminal or a log."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError('%s must map user names to password hashes' % key)
    for user, text in value.items():
        _check_user_name(key, user)
        try:
            PasswordHash.parse(text)
        except ValueError as error:
            raise ConfigError('%s: the password of %s is not a hash (%s); plain-text passwords '
                              'are refused: make one with `tylserver.py hash-password`'
                              % (key, user, error))
    return value


def _check_groups(key, value):
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError('%s must map group names to lists of user names, not %r' % (key, value))
    return {_check_user_name(key, group): _check_list_of(_check_user_name)(key, members)
            for group, members in value.items()}


def _check_rules(key, value):
    """An ordered list of {env: GLOB, read: [...], write: [...], admin: [...]};
    an unknown key is refused, since a typo would silently grant nothing."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise ConfigError('%s must be a list of rules, not %r' % (key, value))
    rules = []
    for number, rule in enumerate(value, 1):
        where = '%s rule %d' % (key, number)
        if not isinstance(rule, dict) or not isinstance(rule.get('env'), str) or not rule['env']:
            raise ConfigError('%s must be a mapping with a non-empty env glob, not %r' % (where, rule))
        unknown = sorted(str(name) for name in set(rule) - {'env'} - set(ACCESS_LEVELS))
        if unknown:
            raise ConfigError('%s has unknown keys %s: a rule has env, %s'
                              % (where, ', '.join(unknown), ', '.join(ACCESS_LEVELS)))
        checked = {'env': rule['env']}
        for level in ACCESS_LEVELS:
            checked[level] = _check_list_of(_check_member)(where, rule.get(level))
        rules.append(checked)
    return rules


def _check_access(settings):
    """What spans several keys: every @group and user named exists (a user
    may also come from a client certificate), and certificates need TLS."""
    groups, users = settings['AUTH_GROUPS'], settings['AUTH_USERS']
    named = [('AUTH_ADMINS', name) for name in settings['AUTH_ADMINS']]
    named += [('AUTH_RULES', name) for rule in settings['AUTH_RULES']
              for level in ACCESS_LEVELS for name in rule[level]]
    named += [('AUTH_GROUPS', name) for members in groups.values() for name in members]
    for key, name in named:
        if name.startswith('@') and name[1:] not in groups:
            raise ConfigError('%s names group %s, which AUTH_GROUPS does not define' % (key, name))
        if not name.startswith('@') and name not in users and not settings['SSL_CLIENT_CERT_USERS']:
            raise ConfigError('%s names user %s, who is not in AUTH_USERS' % (key, name))
    if settings['SSL_CLIENT_CA'] and not settings['USE_SSL']:
        raise ConfigError('SSL_CLIENT_CA needs USE_SSL: true')
    if settings['SSL_CLIENT_CERT_USERS'] and not settings['SSL_CLIENT_CA']:
        raise ConfigError('SSL_CLIENT_CERT_USERS needs SSL_CLIENT_CA, to verify the certificates')


# key: (default, check).  config.yaml repeats every default with a comment;
# a test keeps the two equal.
CONFIG_KEYS = {
    'BACKEND_SERVICE_IP': ('127.0.0.1', _check_string),
    'BACKEND_SERVICE_PORT': (2442, _check_int(0, 65535)),
    'BACKEND_PLUGINS_PATH': ('backends', _check_list_of(_check_string)),
    'BACKEND_CLASS': ('file_backend.FileBackend', _check_class_name),
    'POST_PROCESS_CLASSES': ([], _check_list_of(_check_class_name)),
    'LOG_LEVEL': ('INFO', _check_log_level),
    'LOG_FILE': (None, _check_optional(_check_string)),
    'USE_SSL': (False, _check_bool),
    'SSL_PUBLIC_KEY': ('ssl/public.key', _check_string),
    'SSL_PRIVATE_KEY': ('ssl/private.key', _check_string),
    'SSL_CLIENT_CA': (None, _check_optional(_check_string)),
    'SSL_CLIENT_CERT_USERS': (False, _check_bool),
    'AUTH_USERS': ({}, _check_password_hashes),
    'AUTH_GROUPS': ({}, _check_groups),
    'AUTH_RULES': ([], _check_rules),
    'AUTH_ADMINS': ([], _check_list_of(_check_member)),
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
    'POSTGRES_DSN': (None, _check_optional(_check_string)),
    'POSTGRES_PASSWORD_FILE': (None, _check_optional(_check_string)),
    'POSTGRES_POOL_SIZE': (8, _check_int(1)),
    'POSTGRES_CONNECT_TIMEOUT': (5, _check_seconds),
    'POSTGRES_STATEMENT_TIMEOUT': (30, _check_seconds),
    'HISTORY_KEEP': (100, _check_int(0, 1000000)),
    'HISTORY_KEEP_DAYS': (0, _check_optional(_check_int(0, 36500))),
    'MAX_BODY_BYTES': (256 * 1024 * 1024, _check_int(1)),
    'FORCE_UNLOCK': (True, _check_bool),
    'REQUEST_TIMEOUT': (60, _check_seconds),
    'MAX_CONNECTIONS': (200, _check_int(1)),
    'NOTIFY_QUEUE_SIZE': (1000, _check_int(1)),
    'NOTIFY_ATTEMPTS': (4, _check_int(1, 10)),
    'NOTIFY_TIMEOUT': (10, _check_seconds),
    'NOTIFY_RETRY_DELAY': (1, _check_seconds),
    'SLACK_WEBHOOK_URI': (None, _check_optional(_check_url)),
    'SLACK_NOTIFY_USERNAME': ('TYL', _check_string),
    'SLACK_NOTIFY_USER_IMAGE_URI': (None, _check_optional(_check_url)),
    'SLACK_NOTIFICATIONS_ON_TF_ACTIONS': (['OperationTypeApply'], _check_list_of(_check_string)),
    'SLACK_NOTIFY_HOST_LIST': (True, _check_bool),
    'SLACK_NOTIFY_UNLOCK': (True, _check_bool),
    'SLACK_NOTIFY_FORMAT': ('_Who:_ *{Who}*\n_Operation:_ *{Operation}*\n_Version:_ {Version}\n_ID:_ {ID}',
                            _check_format),
    'SLACK_NOTIFY_UNLOCK_FORMAT': ('_Who:_ *{Who}*\n_ID:_ {ID}', _check_format),
    'WEBHOOK_URL': (None, _check_optional(_check_url)),
    'WEBHOOK_SECRET': (None, _check_optional(_check_string)),
    'AUDIT_LOG': (None, _check_optional(_check_string)),
}

# Keys holding a path, resolved against the directory of the config file.
PATH_KEYS = ('BACKEND_PLUGINS_PATH', 'SSL_PUBLIC_KEY', 'SSL_PRIVATE_KEY', 'SSL_CLIENT_CA',
             'FILE_DATA_PATH', 'SQLITE_DB_PATH', 'PYSHELVE_DATA_PATH', 'AES_KEY_FILE',
             'AES_OLD_KEY_FILES', 'GIT_WORKING_PATH', 'POSTGRES_PASSWORD_FILE', 'AUDIT_LOG',
             'LOG_FILE')

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
    _check_access(settings)
    for key in PATH_KEYS:
        settings[key] = _resolve_path(base, settings[key])
    settings['CONFIG_DIR'], settings['CONFIG_FILE'] = base, path and os.path.abspath(path)
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

# content_md5: the Content-MD5 header of a reply that sends a state.
Reply = namedtuple('Reply', 'status body content_type content_md5', defaults=(None,))
JSON = 'application/json'
TEXT = 'text/plain; charset=utf-8'


class Refusal(Exception):
    """A request refused with a one-line reason: a 4xx the client can fix, or a
    503 to try again."""

    def __init__(self, status, reason, close=False, headers=()):
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.close = close
        self.headers = headers


class StoredDataError(Exception):
    """Bytes read from storage that are not what TYL stores, as a file
    edited by hand: the server's fault, so a 500, never the client's 400."""


def parse_stored(parse, body, what):
    """`parse(body, what)`, inspect_state or parse_json_object, of bytes
    read from storage: their fault is a StoredDataError, not a Refusal."""
    try:
        return parse(body, what)
    except Refusal as refusal:
        raise StoredDataError('stored %s' % refusal.reason) from None


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
    except RecursionError:
        raise Refusal(400, '%s is nested too deeply' % what)
    if not isinstance(value, dict):
        raise Refusal(400, '%s must be a JSON object, not %s' % (what, type(value).__name__))
    return value, text


def _keep_top_level_pairs(found):
    """An object_pairs_hook that builds nothing: each object becomes None,
    and the pairs of the last one seen, the outermost, are kept."""
    def hook(pairs):
        found[:] = pairs
    return hook


def inspect_state(body, what='state'):
    """Check a state body without building it; return its top-level fields.

    The body must be a UTF-8 JSON object without NaN or Infinity literals,
    else a 400 Refusal naming it as `what`.  Nested objects are parsed and dropped one by one,
    so a 50 MB state costs no object tree; the returned dict holds the
    top-level scalars (`version`, `serial`, `lineage`...).
    """
    if not body.lstrip()[:1] == b'{':
        parse_json_object(body, what)  # refuses with the precise reason
    found = []
    decoder = json.JSONDecoder(object_pairs_hook=_keep_top_level_pairs(found),
                               parse_constant=_reject_constant)
    try:
        decoder.decode(body.decode('utf-8'))
    except UnicodeDecodeError:
        raise Refusal(400, '%s is not UTF-8' % what)
    except ValueError as error:
        raise Refusal(400, '%s is not valid JSON: %s' % (what, error))
    except RecursionError:
        raise Refusal(400, '%s is nested too deeply' % what)
    return {key: value for key, value in found if isinstance(value, (str, int, float))}


# A body from this size up is hashed on a second thread while the first
# checks its JSON (see checked_state).
HASH_ASIDE_FROM = 256 * 1024


def checked_state(body):
    """(inspect_state(body), its digests: {'sha256': hex, 'md5': base64}).

    A large body is hashed on a second thread while this one checks it:
    hashlib lets go of the GIL and the JSON decoder does not, so on two
    cores the hashing takes no time of its own.
    """
    digests = {}
    if len(body) < HASH_ASIDE_FROM:
        _hash(body, digests)
        return inspect_state(body), digests
    hasher = threading.Thread(target=_hash, args=(body, digests), daemon=True)
    hasher.start()
    try:
        return inspect_state(body), digests
    finally:
        hasher.join()


def _hash(body, digests):
    digests['sha256'] = hashlib.sha256(body).hexdigest()
    digests['md5'] = _content_md5(body)


def _version_metadata(body, top, holder, sha256=None):
    """What a backend keeping history records of an accepted write: a
    serial or lineage of another type than Terraform's is recorded as null
    (1e400 would be a float infinity, which JSON cannot carry)."""
    holder = tylstore.lock_info(holder)
    serial, lineage = top.get('serial'), top.get('lineage')
    return {
        'serial': serial if _whole_number(serial) else None,
        'lineage': lineage if isinstance(lineage, str) else None,
        'size': len(body),
        'sha256': sha256 or hashlib.sha256(body).hexdigest(),
        'created': time.strftime(tylstore.CREATED_FORMAT, time.gmtime()),
        'lock_id': holder.get('ID'),
        'who': holder.get('Who'),
    }


# What /history lists of each version: its identifier, then its metadata.
METADATA_FIELDS = ('serial', 'lineage', 'size', 'sha256', 'created', 'lock_id', 'who')
VERSION_FIELDS = ('version',) + METADATA_FIELDS

JSON_SPACE = re.compile(r'[ \t\n\r]*')


def _whole_number(value):
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def with_serial(body, serial):
    """`body`, a valid state, with the value of its top-level "serial" set
    to `serial` and every other byte as it was.

    A restored state needs a serial above the current one, or Terraform
    would take it for an older state; re-encoding it would change its
    spacing, key order, number forms and escapes.  So the top-level object
    is walked pair by pair, each value skipped by the decoder (objects in
    it parsed and dropped, as in `inspect_state`), and only the text of
    each top-level "serial" value is replaced: every one, should the key
    be given twice, since readers take the last.
    """
    text = body.decode('utf-8')
    decoder = json.JSONDecoder(object_pairs_hook=lambda pairs: None)
    spans = []
    index = JSON_SPACE.match(text, JSON_SPACE.match(text).end() + 1).end()  # past '{'
    while text[index] != '}':
        key, index = decoder.raw_decode(text, index)
        start = JSON_SPACE.match(text, JSON_SPACE.match(text, index).end() + 1).end()  # past ':'
        index = decoder.raw_decode(text, start)[1]
        if key == 'serial':
            spans.append((start, index))
        index = JSON_SPACE.match(text, index).end()
        if text[index] == ',':
            index = JSON_SPACE.match(text, index + 1).end()
    for start, end in reversed(spans):
        text = text[:start] + str(serial) + text[end:]
    return text.encode('utf-8')


def parse_lock_info(body):
    info, text = parse_json_object(body, 'lock info')
    if not isinstance(info.get('ID'), str) or not info['ID']:
        raise Refusal(400, 'lock info needs a non-empty string "ID"')
    return info, text


# A state file up to this size is read and sent in one write with the
# headers; a larger one is sent from the file (see StateFile).
READ_WHOLE_UP_TO = 1024 * 1024


class StateFile(object):
    """A reply body sent from an open file by socket.sendfile: no memory
    holds it whole, and on a plain connection no copy passes through
    Python.  The file is closed once sent."""

    def __init__(self, stream, size):
        self.stream = stream
        self.size = size

    def __len__(self):
        return self.size

    def send(self, connection):
        with self.stream:
            connection.sendfile(self.stream, count=self.size)


def _file_identity(found):
    """What names a file's content, from its os.stat, when files are
    replaced whole and never rewritten in place."""
    return found.st_dev, found.st_ino, found.st_size, found.st_mtime_ns, found.st_ctime_ns


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
        self.state_in_file = plugins.backend_class.supports('open_tfstate')
        # (the state file's identity, its Content-MD5): see read_to_send.
        self._file_md5 = (None, None)

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

    def notify(self, method_name, obj, text, holder):
        """Hand an accepted change to each post-processor; never fail because
        of one.  `holder` is the lock concerned, as stored or as received."""
        for processor in self.post_processors:
            extra = {'lock_info': tylstore.lock_info(holder)} if processor.LOCK_INFO else {}
            try:
                getattr(processor, method_name)(obj, raw=text, **extra)
            except Exception as error:
                processor.log_error('%s: %s' % (type(error).__name__, error))
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

    def read_to_send(self):
        """The state as GET answers it, with its Content-MD5.

        When the backend keeps the state in a file (open_tfstate), the
        mutex is held only to open it, so readers do not queue behind one
        another; a large state is sent from the file, never held whole in
        memory; and the MD5 is computed once per file, or kept from the
        write that stored it.
        """
        if not self.state_in_file:
            reply = self.read()
            return reply._replace(content_md5=_content_md5(reply.body)) if reply.body else reply
        with self.mutex:
            stream = self.backend.open_tfstate()
        if stream is None:
            return Reply(204, b'', None)
        try:
            found = os.fstat(stream.fileno())
            if not found.st_size:
                stream.close()
                return Reply(204, b'', None)
            md5 = self._md5_of_file(stream, found)
            if found.st_size > READ_WHOLE_UP_TO:
                return Reply(200, StateFile(stream, found.st_size), JSON, md5)
            with stream:
                return Reply(200, tylstore.read_all(stream.fileno()), JSON, md5)
        except BaseException:
            stream.close()
            raise

    def _md5_of_file(self, stream, found):
        """The Content-MD5 of the open state file `stream`, whose os.fstat is
        `found`; a file is never rewritten in place, so its identity names
        its content."""
        identity = _file_identity(found)
        known, md5 = self._file_md5
        if known != identity:
            digest = hashlib.md5()
            for chunk in iter(lambda: stream.read(1024 * 1024), b''):
                digest.update(chunk)
            stream.seek(0)
            md5 = base64.b64encode(digest.digest()).decode('ascii')
            self._file_md5 = (identity, md5)
        return md5

    def write(self, body, lock_id):
        """Store a state; `lock_id` is the request's `?ID=`, or None."""
        top, digests = checked_state(body)
        with self.mutex:
            holder = self.backend.get_lock_state()
            if holder and lock_id != tylstore.lock_id(holder):
                return lock_reply(423, holder)
            if not holder and lock_id is not None:
                return text_reply(409, 'lock %s is not held: the lock was released or '
                                       'force-unlocked; nothing was stored' % _printable(lock_id))
            stored = self._store(body, _version_metadata(body, top, holder, digests['sha256']),
                                 holder)
            if self.state_in_file and isinstance(stored, os.stat_result):
                # The next GET need not read the file to hash it.  Not from
                # a stat taken here: another server process on the same
                # storage may have replaced the file already.
                self._file_md5 = (_file_identity(stored), digests['md5'])
        return Reply(200, b'', None)

    def _store(self, body, metadata, holder):
        """Hand an accepted state to the backend, then to the post-processors
        (call under `mutex`).  `metadata` is what a history records of it.

        The state is unpacked only for those who need the object: plugins
        that do not store raw bytes, and post-processors.  Returns what a
        RAW_BYTES backend's store_tfstate returned.
        """
        state = text = stored = None
        if self.post_processors or not self.plugins.backend_class.RAW_BYTES:
            state, text = parse_json_object(body, 'state')
        if self.plugins.backend_class.RAW_BYTES:
            stored = self.backend.store_tfstate(state, raw_bytes=body, metadata=metadata,
                                                holder_id=tylstore.lock_id(holder))
        else:
            self.backend.store_tfstate(state, raw=text)
        self.notify('process_tfstate', state, text, holder)
        return stored

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
            self.notify('on_locked', info, text, info)
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
            self.notify('on_unlocked', info, text, holder)
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
                self.notify('on_unlocked', {}, '{}', holder)
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
            if self.plugins.backend_class.RAW_BYTES:   # checked again, as a write is
                backend.delete_tfstate(holder_id=tylstore.lock_id(holder))
            else:
                backend.delete_tfstate()
        return Reply(200, b'', None)

    # -- history, restore and the admin commands ----------------------------

    def keeps_history(self):
        return self.plugins.backend_class.supports('list_versions')

    def versions(self):
        """The versions kept, newest first, each with exactly VERSION_FIELDS."""
        self._require_history()
        with self.mutex:
            versions = self.backend.list_versions()
        return [{field: version.get(field) for field in VERSION_FIELDS} for version in versions]

    def history(self):
        return Reply(200, json.dumps(self.versions(), indent=2).encode('utf-8'), JSON)

    def read_version(self, version):
        self._require_history()
        with self.mutex:
            state = self.backend.get_version(version)
        if state is None:
            raise Refusal(404, 'env %s has no version %s' % (self.name, _printable(version)[:80]))
        return Reply(200, state, JSON, _content_md5(state))

    def restore(self, version, who):
        """Store version `version` again as a new version, its top-level
        serial one above the current state's, so that Terraform takes it
        for the newer state (see `with_serial`)."""
        with self.own_lock(who, 'OperationTypeRestore', 'version %s' % version) as lock_id:
            body, serial = self._restorable(version)
            reply = self.write(body, lock_id)
        if reply.status != 200:
            return reply
        restored = {'restored': version, 'serial': serial, 'sha256': hashlib.sha256(body).hexdigest()}
        return Reply(200, json.dumps(restored).encode('utf-8'), JSON)

    def import_state(self, body, who):
        """Store `body` as the state, whatever it replaces."""
        with self.own_lock(who, 'OperationTypeImport') as lock_id:
            return self.write(body, lock_id)

    @contextlib.contextmanager
    def own_lock(self, who, operation, info=''):
        """Hold the lock as `who` for the block, yielding its ID.

        An admin command changes a state the way a Terraform run does,
        through the same lock, write and unlock rules, so it never
        overwrites a run that holds the lock, here or through another server
        process on the same storage: it is refused with 423 instead.
        """
        lock_id = str(uuid.uuid4())
        body = json.dumps({'ID': lock_id, 'Operation': operation, 'Info': info, 'Who': who,
                           'Version': 'TYL ' + __version__, 'Path': '',
                           'Created': time.strftime(tylstore.CREATED_FORMAT, time.gmtime())}).encode()
        reply = self.lock(body)
        if reply.status != 200:
            holder = tylstore.lock_info(reply.body)
            raise Refusal(423, 'env %s is locked by %s (lock %s, %s); nothing was changed'
                          % (self.name, _lock_field(holder, 'Who'), _lock_field(holder, 'ID'),
                             _lock_field(holder, 'Operation', 40)))
        try:
            yield lock_id
        finally:
            self.unlock(body)

    def copy_from(self, source):
        """Copy `source`, the environment of this name on another backend,
        here: the versions, oldest first, when both keep a history (each
        with its metadata; only its identifier is new), then the state
        unless it is the newest version, then the lock.

        Returns the number of versions copied, or None when this environment
        already holds the same state (a migration run again).  Anything else
        here already is refused: nothing is overwritten.
        """
        state, holder = source.read().body, source.lock_holder()
        present = self.read().body
        if present or self.lock_holder() or (self.keeps_history() and self.versions()):
            if present == state:
                return None
            raise Refusal(409, 'env %s already holds another state or a lock here; '
                               'nothing was copied' % self.name)
        keep = self.plugins.constants.HISTORY_KEEP
        versions = source.versions()[:keep] if source.keeps_history() and self.keeps_history() else []
        newest = b''
        with self.mutex:
            for version in reversed(versions):
                newest = source.read_version(version['version']).body
                self._store(newest, {field: version[field] for field in METADATA_FIELDS}, '')
            if state and state != newest:  # who wrote it is not known: no holder
                self._store(state, _version_metadata(state, inspect_state(state), ''), '')
            if newest and not state:
                self.backend.delete_tfstate()
            if holder:
                raw = lock_bytes(holder)
                self.backend.set_locked(tylstore.lock_info(holder), raw=raw.decode('utf-8'),
                                        **self._raw_bytes(raw))
        return len(versions)

    def lock_holder(self):
        with self.mutex:
            return self.backend.get_lock_state()

    def _require_history(self):
        if not self.keeps_history():
            raise Refusal(404, 'no history: %s keeps none' % self.plugins.backend_class.__name__)

    def _restorable(self, version):
        """(the bytes of version `version` with their top-level serial set
        one above the current state's, or above their own when there is no
        state, or it has none or cannot be read, that serial)."""
        old = self.read_version(version).body
        serial = parse_stored(inspect_state, old, 'version %s' % _printable(version)[:80]).get('serial')
        if not _whole_number(serial):
            raise Refusal(409, 'version %s has no whole-number top-level "serial" to set'
                          % _printable(version)[:80])
        current = self.read().body
        try:
            current_serial = inspect_state(current).get('serial') if current else None
        except Refusal:  # a state edited by hand: restoring is how it is repaired
            current_serial = None
        if _whole_number(current_serial):
            serial = max(serial, current_serial)
        try:
            return with_serial(old, serial + 1), serial + 1
        except ValueError:  # more digits than Python writes out (sys.get_int_max_str_digits)
            raise Refusal(409, 'the serial of version %s is too large to go one above'
                          % _printable(version)[:80])

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
# The audit log and the log file
# --------------------------------------------------------------------------

class AuditLog(object):
    """AUDIT_LOG: a JSON line for each request or admin command that would
    change a state, whatever its answer, so that refusals are on record too.

    The file is opened once, with O_APPEND, and each line leaves in one
    write() under a lock: lines of threads, or of an admin command beside
    the server, never interleave, and json.dumps escapes a newline sent in
    a field.  Lines are not fsynced: a disk flush per lock would slow every
    Terraform run for a trail that a crash costs only its last lines of.
    """

    def __init__(self, path):
        self._lock = threading.Lock()
        self._fd = None
        if path is not None:
            try:
                self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            except OSError as error:
                raise ConfigError('AUDIT_LOG: cannot open %s: %s' % (path, error.strerror))

    @property
    def enabled(self):
        """Whether AUDIT_LOG is set: callers skip preparing a line otherwise."""
        return self._fd is not None

    def record(self, client, user, environment, action, lock, status, written=(None, None)):
        """One line: `lock` is the LockInfo concerned (a dict), `written`
        the (serial, sha256) of a state stored."""
        if self._fd is None:
            return
        serial, sha256 = written
        line = json.dumps({
            'time': time.strftime(tylstore.CREATED_FORMAT, time.gmtime()), 'client': client,
            'user': user, 'env': environment, 'action': action, 'lock_id': lock.get('ID'),
            'who': lock.get('Who'), 'serial': serial, 'sha256': sha256, 'status': status,
        }) + '\n'
        with self._lock:
            os.write(self._fd, line.encode('utf-8'))

    def reopen(self, path):
        """Open `path` afresh (SIGHUP, after logrotate moved the file); on
        failure the file already open is kept."""
        if self._fd is None:
            return
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        with self._lock:
            fd, self._fd = self._fd, fd
        os.close(fd)


def stored_state(body):
    """(serial, sha256) of a state stored, as AUDIT_LOG records it."""
    return inspect_state(body).get('serial'), hashlib.sha256(body).hexdigest()


def restored_state(reply):
    """(serial, sha256) of the state a restore stored, from its 200 Reply."""
    restored = json.loads(reply.body)
    return restored['serial'], restored['sha256']


class LogFile(logging.StreamHandler):
    """LOG_FILE: TYL's own log, appended to a file created 0600, since its
    lines name users, clients and environments.  SIGHUP reopens it, so that
    logrotate can move the file away without copytruncate's lost lines."""

    def __init__(self, path):
        try:
            super().__init__(self._open(path))
        except OSError as error:
            raise ConfigError('LOG_FILE: cannot open %s: %s' % (path, error.strerror))

    @staticmethod
    def _open(path):
        return open(path, 'a', encoding='utf-8',
                    opener=lambda name, flags: os.open(name, flags, 0o600))

    def reopen(self, path):
        """Open `path` afresh (SIGHUP, after logrotate moved the file); on
        failure the file already open is kept."""
        self.setStream(self._open(path)).close()


# --------------------------------------------------------------------------
# Authentication
# --------------------------------------------------------------------------

# scrypt's cost as Django chose it: 16 MiB and some 60 ms per check.
SCRYPT_COST = (2 ** 14, 8, 1)
# PBKDF2-SHA256 iterations (OWASP, 2023), for a Python built without scrypt.
PBKDF2_ITERATIONS = 600000
# Password checks running at once: each takes a core and, with scrypt, 16 MiB.
CHECKS_AT_ONCE = 4


class PasswordHash(namedtuple('PasswordHash', 'scheme cost salt digest')):
    """One AUTH_USERS value: `scrypt$N$r$p$SALT$HASH` or
    `pbkdf2_sha256$ITERATIONS$SALT$HASH`, salt and hash in base64.

    Salt and cost travel in the string, so a user's hash can be made
    stronger later with no change here.
    """

    COST_FIELDS = {'scrypt': 3, 'pbkdf2_sha256': 1}

    @classmethod
    def parse(cls, text):
        """The parsed hash, or ValueError saying what is wrong, never quoting
        `text`: it may be a password written there by mistake."""
        parts = text.split('$') if isinstance(text, str) else ['']
        fields = cls.COST_FIELDS.get(parts[0])
        if fields is None or len(parts) != fields + 3:
            raise ValueError('not scrypt$N$r$p$salt$hash nor pbkdf2_sha256$iterations$salt$hash')
        if not all(re.fullmatch(r'[1-9][0-9]{0,8}', part) for part in parts[1:-2]):
            raise ValueError('its cost is not whole numbers')
        try:
            salt, digest = [base64.b64decode(part, validate=True) for part in parts[-2:]]
        except ValueError:
            raise ValueError('its salt or hash is not base64')
        if len(salt) < 8 or len(digest) < 16:
            raise ValueError('its salt or hash is too short')
        parsed = cls(parts[0], tuple(int(part) for part in parts[1:-2]), salt, digest)
        if parsed.scheme == 'scrypt':
            parsed.check_scrypt_cost()
        return parsed

    def check_scrypt_cost(self):
        n, r, p = self.cost
        if n < 2 or n & (n - 1) or 128 * r * n > 256 * 2 ** 20 or p > 16:
            raise ValueError('scrypt needs N a power of 2, 128 * N * r at most 256 MiB, p at most 16')
        if not hasattr(hashlib, 'scrypt'):
            raise ValueError('this Python has no scrypt: use pbkdf2_sha256')

    def derive(self, password):
        """The digest of `password` (bytes) under this hash's salt and cost."""
        if self.scheme == 'scrypt':
            n, r, p = self.cost
            return hashlib.scrypt(password, salt=self.salt, n=n, r=r, p=p, dklen=len(self.digest),
                                  maxmem=128 * r * (n + p + 2) + 2 ** 20)
        return hashlib.pbkdf2_hmac('sha256', password, self.salt, self.cost[0], len(self.digest))

    def matches(self, password):
        return hmac.compare_digest(self.derive(password), self.digest)

    def decoy(self):
        """A hash of the same scheme and cost that no password matches: an
        unknown user's password is checked against it, at the same cost."""
        return self._replace(salt=os.urandom(len(self.salt)), digest=os.urandom(len(self.digest)))

    def __str__(self):
        return '$'.join([self.scheme] + [str(number) for number in self.cost]
                        + [base64.b64encode(data).decode('ascii') for data in (self.salt, self.digest)])


def hash_password(password):
    """The AUTH_USERS string for `password`: scrypt (PBKDF2-SHA256 on a
    Python without it) with a fresh 16-byte salt."""
    if hasattr(hashlib, 'scrypt'):
        blank = PasswordHash('scrypt', SCRYPT_COST, os.urandom(16), bytes(32))
    else:
        blank = PasswordHash('pbkdf2_sha256', (PBKDF2_ITERATIONS,), os.urandom(16), bytes(32))
    return str(blank._replace(digest=blank.derive(password.encode('utf-8'))))


class FailedLogins(object):
    """Failed logins per (user name, client address), to slow guessing down.

    After a failure the pair must wait FIRST_WAIT seconds, doubled with each
    further failure up to MAX_WAIT, before its next attempt is even checked;
    until then it gets 429 at once.  Refusing at once, rather than sleeping
    before the answer, keeps a guesser from holding threads and connection
    slots.  Only that pair waits: the owner, from another address, is never
    locked out.  A pair quiet for FORGET_AFTER seconds starts afresh, and at
    most MAX_PAIRS are remembered, the oldest dropped first.
    """

    FIRST_WAIT = 1.0
    MAX_WAIT = 60.0
    FORGET_AFTER = 15 * 60
    MAX_PAIRS = 10000
    TURNS = 64

    def __init__(self):
        self._lock = threading.Lock()
        self._pairs = OrderedDict()     # (user, address) -> (failures, retry_at)
        self._turns = [threading.Lock() for _ in range(self.TURNS)]

    def turn(self, pair):
        """A lock under which the attempts of `pair` are checked one at a
        time, so that guesses sent in parallel cannot all be checked before
        the first failure counts."""
        return self._turns[hash(pair) % self.TURNS]

    def wait(self, pair):
        """Seconds `pair` must still wait before an attempt is checked."""
        with self._lock:
            _, retry_at = self._pairs.get(pair, (0, 0.0))
        return max(0.0, retry_at - time.monotonic())

    def record(self, pair):
        """Count a failure of `pair`; return how many in a row."""
        now = time.monotonic()
        with self._lock:
            failures, retry_at = self._pairs.pop(pair, (0, now))
            if now - retry_at > self.FORGET_AFTER:
                failures = 0
            failures += 1
            wait = min(self.FIRST_WAIT * 2 ** min(failures - 1, 16), self.MAX_WAIT)
            self._pairs[pair] = (failures, now + wait)
            while len(self._pairs) > self.MAX_PAIRS:
                self._pairs.popitem(last=False)
        return failures

    def forget(self, pair):
        with self._lock:
            self._pairs.pop(pair, None)


def _basic_credentials(value):
    """(user, password) of an `Authorization: Basic` value, or None when it
    is not one.  The user ends at the first colon, so a password may hold
    colons; both are UTF-8 (RFC 7617)."""
    scheme, _, encoded = value.strip().partition(' ')
    if scheme.lower() != 'basic':
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode('utf-8')
    except ValueError:
        return None
    user, colon, password = decoded.partition(':')
    if not colon or not user:
        return None
    return user, password


def _members(names, groups):
    """The user names in `names`, each @group replaced by its members."""
    users = set()
    for name in names:
        users.update(groups[name[1:]] if name.startswith('@') else [name])
    return users


class Access(object):
    """Who a request speaks for, and what that user may do.

    Built once from AUTH_USERS, AUTH_GROUPS, AUTH_RULES, AUTH_ADMINS and
    SSL_CLIENT_CERT_USERS.  It is off (`required` false) only when neither
    names a user; then every request may do everything.  The client's
    address never grants anything.
    """

    CHALLENGE = ('WWW-Authenticate', 'Basic realm="TYL", charset="UTF-8"')

    def __init__(self, constants):
        self.users = {name: PasswordHash.parse(text) for name, text in constants.AUTH_USERS.items()}
        self.certificate_users = constants.SSL_CLIENT_CERT_USERS
        self.required = bool(self.users) or self.certificate_users
        groups = constants.AUTH_GROUPS
        self.admins = _members(constants.AUTH_ADMINS, groups)
        self.rules = [(rule['env'].lower(), self._grants(rule, groups))
                      for rule in constants.AUTH_RULES]
        first = next(iter(self.users.values()), None)
        self.decoy = first.decoy() if first else None
        self.failures = FailedLogins()
        self.checking = threading.BoundedSemaphore(CHECKS_AT_ONCE)
        self._key = os.urandom(32)
        self._verified = set()

    @staticmethod
    def _grants(rule, groups):
        """Level -> the users holding it under `rule`: admin may also
        write, and write may also read."""
        grants, users = {}, set()
        for level in reversed(ACCESS_LEVELS):
            users = users | _members(rule[level], groups)
            grants[level] = users
        return grants

    def allows(self, user, level, environment=None):
        """Whether `user` holds `level` on `environment`, or on at least one
        environment when it is None.  The first rule whose env glob matches
        decides; globs ignore case, so that PROD-1 cannot slip past a rule
        for prod-* where the storage ignores case."""
        if not self.required or user in self.admins:
            return True
        if environment is None:
            return any(user in grants[level] for _, grants in self.rules)
        for pattern, grants in self.rules:
            if fnmatch.fnmatchcase(environment.lower(), pattern):
                return user in grants[level]
        return False

    def certificate_user(self, certificate):
        """The subject CN of a verified client certificate, when
        SSL_CLIENT_CERT_USERS is on and the subject has exactly one CN."""
        if not self.certificate_users or not certificate:
            return None
        names = [value for rdn in certificate.get('subject', ()) for key, value in rdn
                 if key == 'commonName']
        return names[0] if len(names) == 1 else None

    def authenticate(self, authorization, certificate_user, address):
        """The user a request speaks for: from its one `Authorization: Basic`
        header, else from its client certificate.  Otherwise a 401 Refusal,
        the same for an unknown user as for a wrong password, or 429 while
        this (user, address) must wait after failed attempts."""
        if not authorization and certificate_user:
            return certificate_user
        if len(authorization) != 1:
            raise self.challenge('authentication required' if not authorization
                                 else 'more than one Authorization header')
        credentials = _basic_credentials(authorization[0])
        if credentials is None:
            log.warning('%s login failed: malformed Basic credentials', address)
            raise self.challenge('malformed Basic credentials')
        user, password = credentials
        pair = (user, address)
        self._refuse_while_waiting(pair)
        if self.known_password(user, password.encode('utf-8')):
            return user     # never queued behind the checks of others' guesses
        with self.failures.turn(pair):
            self._refuse_while_waiting(pair)    # a failure may have come meanwhile
            if self.check_password(user, password.encode('utf-8')):
                self.failures.forget(pair)
                return user
            failures = self.failures.record(pair)
        log.warning('%s login failed for user "%s" (%d in a row from this address)',
                    address, _printable(user)[:128], failures)
        raise self.challenge('wrong user name or password')

    def challenge(self, reason):
        return Refusal(401, reason, headers=[self.CHALLENGE])

    def _refuse_while_waiting(self, pair):
        """429 while `pair` must wait after failed attempts."""
        wait = math.ceil(self.failures.wait(pair))
        if wait:
            raise Refusal(429, 'too many failed logins; try again in %d s' % wait,
                          headers=[('Retry-After', str(wait))])

    def known_password(self, user, password):
        """Whether (user, password) was verified already.  A pair once
        verified is remembered as a digest keyed by a secret of this
        process, so the many requests of one Terraform run cost one hash,
        not one each; nothing else is remembered, so the memory this takes
        is bounded by the number of users."""
        return self._verified_digest(user, password) in self._verified

    def _verified_digest(self, user, password):
        return hmac.new(self._key, user.encode('utf-8') + b':' + password, 'sha256').digest()

    def check_password(self, user, password):
        """Constant-time, and an unknown user costs one hash, as a wrong
        password does.  When CHECKS_AT_ONCE checks are running for a second
        already (a flood of guesses), the request gets 503 at once rather
        than a place in a queue that would hold its thread and connection."""
        if self.known_password(user, password):
            return True
        if self.decoy is None:
            return False
        expected = self.users.get(user)
        if not self.checking.acquire(timeout=1):
            raise Refusal(503, 'too many password checks under way; try again',
                          headers=[('Retry-After', '1')])
        try:
            matches = (expected or self.decoy).matches(password)
        finally:
            self.checking.release()
        if matches and expected is not None:
            self._verified.add(self._verified_digest(user, password))
            return True
        return False


# --------------------------------------------------------------------------
# The dashboard
# --------------------------------------------------------------------------

# GET /ui lists the environments, GET /ui/env?env=NAME shows one, and
# POST /ui/force-unlock?env=NAME is the one form that changes anything.
# The pages are made here whole: no script, nothing loaded from elsewhere,
# so they work air-gapped.  Every value put in a page is escaped (see
# Markup): a lock's fields and a state's contents come from clients.

HTML = 'text/html; charset=utf-8'
# Sent with every dashboard reply: never cached nor framed, no script and
# nothing from elsewhere, forms posted only back here.
DASHBOARD_HEADERS = (
    ('Cache-Control', 'no-store'),
    ('Content-Security-Policy', "default-src 'none'; style-src 'unsafe-inline'; "
                                "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"),
    ('X-Frame-Options', 'DENY'),
    ('Referrer-Policy', 'no-referrer'),
    ('X-Content-Type-Options', 'nosniff'),
)
DASHBOARD_CSS = ('body{font:14px/1.45 sans-serif;margin:1.5em;color:#1d1d1f}'
                 'h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.6em}h3{font-size:1em}'
                 'table{border-collapse:collapse}th,td{border:1px solid #ccc;padding:.25em .6em;'
                 'text-align:left;vertical-align:top}th{background:#f2f2f2}'
                 'td{font-family:monospace;overflow-wrap:anywhere}.error{color:#a00}'
                 'form{margin:.8em 0}button{padding:.3em .9em}')
OVERVIEW_HEADINGS = ('Environment', 'Locked by', 'Operation', 'Lock ID', 'Locked', 'Serial',
                     'Lineage', 'Size', 'Last write', 'Resources')
# Terraform's LockInfo fields, shown first and in this order.
LOCK_FIELDS = ('ID', 'Operation', 'Info', 'Who', 'Version', 'Created', 'Path')
# RFC 3339, as a lock's Created: Terraform writes up to nine fractional
# digits, more than datetime.fromisoformat reads.
RFC3339 = re.compile(r'(\d{4})-(\d\d)-(\d\d)[Tt ](\d\d):(\d\d):(\d\d)(?:\.\d+)?([Zz]|[+-]\d\d:\d\d)')


class Dashboard(object):
    """What the dashboard keeps from one request to the next: the secret
    its form tokens are made with, new at each start, and the resource
    count of each environment's state as last shown."""

    def __init__(self):
        self._key = os.urandom(32)
        self._lock = threading.Lock()
        self._counts = {}   # environment name -> ((size, serial, lineage), count)

    def form_token(self, user, environment, action):
        """The CSRF token of a form.  A browser sends the user's Basic
        credentials with any request to this server, even one that another
        site makes it send, so a form must also carry what only a page of
        this server shows.  The token is an HMAC of (user, environment,
        action): one shown to a user for a form serves no other."""
        message = json.dumps([user, environment, action]).encode('utf-8')
        return hmac.new(self._key, message, 'sha256').hexdigest()

    def resource_count(self, name, state, top):
        """The number of resource instances in `state` (bytes; `top` its
        top-level fields), counted again only when its (size, serial,
        lineage) changed: a page reloaded every few seconds does not parse
        an unchanged 50 MB state each time."""
        key = (len(state), top.get('serial'), top.get('lineage'))
        with self._lock:
            cached = self._counts.get(name)
        if cached is None or cached[0] != key:
            parsed, _ = parse_stored(parse_json_object, state, 'state')
            cached = (key, sum(1 for _ in resource_instances(parsed)))
            with self._lock:
                self._counts[name] = cached
        return cached[1]


def resource_instances(state):
    """Yield (address, attributes) for each resource instance of `state`,
    a parsed state.  Version 4 lists resources[].instances, addressed as
    Terraform does from module, mode, type, name and index key
    (module.a.data.t.n["k"]); version 3 lists modules[].resources, keyed
    within their module path.  A resources, instances or modules that is
    not a list, and an entry of one that is not an object, are skipped."""
    for resource in _objects(state.get('resources')):
        parts = [resource.get('module'), 'data' if resource.get('mode') == 'data' else None,
                 resource.get('type'), resource.get('name')]
        address = '.'.join(str(part) for part in parts if part)
        for instance in _objects(resource.get('instances')):
            key = instance.get('index_key')
            index = '' if key is None else '[%s]' % json.dumps(key, ensure_ascii=False)
            yield address + index, instance.get('attributes', instance.get('attributes_flat'))
    for module in _objects(state.get('modules')):
        path = module.get('path')
        prefix = ''.join('module.%s.' % name for name in (path if isinstance(path, list) else [])[1:])
        resources = module.get('resources')
        for key, resource in (resources.items() if isinstance(resources, dict) else ()):
            primary = resource.get('primary') if isinstance(resource, dict) else None
            yield prefix + key, primary.get('attributes') if isinstance(primary, dict) else None


def _objects(items):
    """The JSON objects in `items`, when it is a list."""
    return [item for item in items if isinstance(item, dict)] if isinstance(items, list) else []


def resource_diff(old, new):
    """(added, removed, changed) from the parsed state `old` to `new`: the
    sorted addresses of the resource instances only `new` has, only `old`
    has, and both have with other attributes."""
    before, after = dict(resource_instances(old)), dict(resource_instances(new))
    return (sorted(after.keys() - before.keys()), sorted(before.keys() - after.keys()),
            sorted(address for address in after.keys() & before.keys()
                   if after[address] != before[address]))


def dashboard_environment_names(server):
    """The environments the dashboard lists: those the backend has stored,
    when it can list them (a name only read, or mistyped, is not one), else
    those served since start; never the one the health check reads."""
    plugins = server.environments.plugins
    if plugins.backend_class.supports('list_environments'):
        names = set(plugins.backend_class.list_environments(plugins.constants))
    else:
        names = {name for name, _ in server.environments.snapshot()}
    names.discard(HEALTH_ENVIRONMENT)
    return sorted(name for name in names if tylstore.ENVIRONMENT_NAME.fullmatch(name))


class Markup(str):
    """HTML made here, from escaped values, put in a page as it is; any
    other value is escaped first (see `_html`)."""


def _html(value):
    """`value` as HTML: Markup as it is, anything else escaped; None is a dash."""
    if isinstance(value, Markup):
        return value
    return html.escape('\u2014' if value is None else str(value))


def _markup(template, *values):
    """`template` with each of `values` put in as `_html` gives it."""
    return Markup(template % tuple(_html(value) for value in values))


def _join(*parts):
    return Markup(''.join(_html(part) for part in parts))


def _page(title, *parts):
    """A whole HTML document, as bytes."""
    return _markup('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>%s</title>'
                   '<style>%s</style></head><body>%s</body></html>\n',
                   title, Markup(DASHBOARD_CSS), _join(*parts)).encode('utf-8')


def _table(headings, rows):
    """A table of `rows` under `headings`; a row shorter than the headings
    has its last cell span the rest, as an error in place of the values."""
    parts = [Markup('<table><tr>')] + [_markup('<th>%s</th>', heading) for heading in headings]
    for row in rows:
        span = len(headings) - len(row) + 1
        parts += [Markup('</tr><tr>')] + [_markup('<td>%s</td>', cell) for cell in row[:-1]]
        parts.append(_markup('<td colspan="%s">%s</td>', span, row[-1]) if span > 1
                     else _markup('<td>%s</td>', row[-1]))
    return _join(*parts, Markup('</tr></table>'))


def _environment_link(name):
    return _markup('<a href="/ui/env?%s">%s</a>', urlencode({'env': name}), name)


def _age(created):
    """How long ago `created`, a lock's Created, was, as '3 min ago'; '?'
    when it is not an RFC 3339 time."""
    found = RFC3339.fullmatch(created) if isinstance(created, str) else None
    if not found:
        return '?'
    try:
        when = datetime.datetime(*[int(part) for part in found.groups()[:6]],
                                 tzinfo=datetime.timezone.utc)
        zone = found.group(7)
        if zone.upper() != 'Z':
            offset = datetime.timedelta(hours=int(zone[1:3]), minutes=int(zone[4:6]))
            when = when - offset if zone[0] == '+' else when + offset
    except (ValueError, OverflowError):  # as month 13, a leap second, or past year 9999
        return '?'
    seconds = max(0, int(time.time() - when.timestamp()))
    if seconds >= 2 * 86400:
        return '%d days ago' % (seconds // 86400)
    if seconds >= 3600:
        return '%d h ago' % (seconds // 3600)
    if seconds >= 60:
        return '%d min ago' % (seconds // 60)
    return '%d s ago' % seconds


def _human_size(size):
    """A size in bytes as people read it: 812 B, 1.5 KB, 42.0 MB; what is
    not a whole number (None, or a backend's odd metadata) stays as it is."""
    if not _whole_number(size):
        return size
    if size < 1024:
        return '%d B' % size
    for unit in ('KB', 'MB', 'GB'):
        size /= 1024.0
        if size < 1024 or unit == 'GB':
            return '%.1f %s' % (size, unit)


def _lock_cells(held):
    """Who, Operation, ID and age of the lock `held`: dashes when none is
    held, '?' for what the lock does not say."""
    if not held:
        return [None] * 4
    lock = tylstore.lock_info(held)
    return [lock.get('Who', '?'), lock.get('Operation', '?'), lock.get('ID', '?'),
            _age(lock.get('Created'))]


def _environment_cells(server, environment):
    """An overview row, less the name: the lock, then the state's serial,
    lineage, size, last write (from the history) and resource count."""
    held = environment.lock_holder()
    state = environment.read().body
    top = parse_stored(inspect_state, state, 'state') if state else {}
    versions = environment.versions() if environment.keeps_history() else []
    return _lock_cells(held) + [
        top.get('serial'), top.get('lineage'), _human_size(len(state)) if state else None,
        versions[0]['created'] if versions else None,
        server.dashboard.resource_count(environment.name, state, top) if state else None]


def _overview_row(server, name):
    return [_environment_link(name)] + _cells_or_error(server, name)


def _cells_or_error(server, name):
    """_environment_cells, or the error that stopped them in one cell: a
    failing backend or unreadable stored data shows there, so that one
    broken environment hides neither the others nor the rest of its page."""
    try:
        return _environment_cells(server, server.environments[name])
    except Exception as error:
        reason = '%s: %s' % (type(error).__name__, _one_line(error))
        log.warning('dashboard: env %s: %s', name, _printable(reason))
        return [_markup('<span class="error">%s</span>', reason)]


def render_dashboard(server, names):
    """GET /ui: a row for each environment of `names`."""
    rows = [_overview_row(server, name) for name in names]
    return _page('TYL environments', Markup('<h1>Environments</h1>'),
                 _table(OVERVIEW_HEADINGS, rows) if rows else Markup('<p>No environment yet.</p>'))


def _lock_details(held):
    """Every field of the lock `held`, Terraform's first, and its age."""
    if not held:
        return Markup('<p>Not locked.</p>')
    lock = tylstore.lock_info(held)
    if not lock:    # not a JSON object: shown as stored
        return _markup('<pre>%s</pre>', lock_bytes(held).decode('utf-8', 'replace'))
    fields = list(LOCK_FIELDS) + [field for field in lock if field not in LOCK_FIELDS]
    rows = [(field, lock.get(field)) for field in fields] + [('Locked', _age(lock.get('Created')))]
    return _table(('Field', 'Value'), rows)


def _force_unlock_form(name, token):
    return _markup('<form method="post" action="/ui/force-unlock?%s">'
                   '<input type="hidden" name="csrf_token" value="%s">'
                   '<button type="submit">Force-unlock</button> releases this lock, whoever '
                   'holds it, as <code>terraform force-unlock</code> does.</form>',
                   urlencode({'env': name}), token)


def _history_table(versions):
    if not versions:
        return Markup('<p>No version kept yet.</p>')
    return _table(('Version', 'Serial', 'Created', 'Who', 'Lock ID', 'Size', 'SHA-256'),
                  [(v['version'], v['serial'], v['created'], v['who'], v['lock_id'],
                    _human_size(v['size']), _short_digest(v['sha256'])) for v in versions])


def _short_digest(sha256):
    """The first 12 characters of a version's sha256, shown as enough to
    tell versions apart; a backend's odd metadata is shown as it is."""
    return str(sha256)[:12] if sha256 else None


def _version_select(field, versions, chosen):
    options = [_markup('<option value="%s"%s>%s</option>', v['version'],
                       Markup(' selected') if v['version'] == chosen else '',
                       '%s: serial %s, %s' % (v['version'], v['serial'], v['created']))
               for v in versions]
    return _join(_markup('<select name="%s">', field), *options, Markup('</select>'))


def _resource_list(kind, addresses):
    """One list of a comparison, in <section id="added"> (or removed, changed)."""
    items = [_markup('<li>%s</li>', address) for address in addresses]
    return _join(_markup('<section id="%s"><h3>%s: %s</h3>', kind, kind.capitalize(), len(addresses)),
                 _join(Markup('<ul>'), *items, Markup('</ul>')) if items else Markup('<p>None.</p>'),
                 Markup('</section>'))


def _version_state(environment, version):
    return parse_stored(parse_json_object, environment.read_version(version).body,
                        'version %s' % version)[0]


def _comparison(environment, versions, chosen):
    """The form choosing two versions, `chosen` ((from, to), None for the
    default: the two newest), and the resource instances added, removed
    and changed from the first to the second."""
    if len(versions) < 2:
        return Markup('<p>A comparison needs two versions.</p>')
    old = versions[1]['version'] if chosen[0] is None else chosen[0]
    new = versions[0]['version'] if chosen[1] is None else chosen[1]
    form = _join(_markup('<form method="get" action="/ui/env"><input type="hidden" name="env" '
                         'value="%s"><label>From ', environment.name),
                 _version_select('from', versions, old), Markup('</label> <label>to '),
                 _version_select('to', versions, new),
                 Markup('</label> <button type="submit">Compare</button></form>'))
    try:
        added, removed, changed = resource_diff(_version_state(environment, old),
                                                _version_state(environment, new))
    except StoredDataError as error:
        return _join(form, _markup('<p class="error">%s</p>', str(error)))
    return _join(form, _resource_list('added', added), _resource_list('removed', removed),
                 _resource_list('changed', changed))


def render_environment_page(server, environment, token, chosen):
    """GET /ui/env: one environment's overview row, its lock, with the
    force-unlock form when `token` (the form's) is given, its versions,
    and the resources that changed between the two versions `chosen`."""
    held = environment.lock_holder()
    parts = [Markup('<p><a href="/ui">All environments</a></p>'),
             _markup('<h1>%s</h1>', environment.name),
             _table(OVERVIEW_HEADINGS[1:], [_cells_or_error(server, environment.name)]),
             Markup('<h2>Lock</h2>'), _lock_details(held)]
    if held and token:
        parts.append(_force_unlock_form(environment.name, token))
    parts.append(Markup('<h2>History</h2>'))
    if environment.keeps_history() and not environment.plugins.constants.HISTORY_KEEP:
        parts.append(Markup('<p>History is off: <code>HISTORY_KEEP: 0</code>.</p>'))
    elif environment.keeps_history():
        versions = environment.versions()
        parts += [_history_table(versions), Markup('<h2>Changes</h2>'),
                  _comparison(environment, versions, chosen)]
    else:
        parts.append(_markup('<p>%s keeps no history.</p>', environment.plugins.backend_class.__name__))
    return _page('TYL: ' + environment.name, *parts)


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
        '/history': {'GET': 'show_history'},
        '/restore': {'POST': 'restore_version'},
        '/health': {'GET': 'show_health'},
        '/metrics': {'GET': 'show_metrics'},
        '/ui': {'GET': 'show_dashboard'},
        '/ui/env': {'GET': 'show_dashboard_environment'},
        '/ui/force-unlock': {'POST': 'force_unlock_from_dashboard'},
    }
    ALL_METHODS = 'GET, POST, PUT, DELETE, LOCK, UNLOCK'
    # The level each action needs (see AUTH_RULES) on the environment it
    # names, or on at least one when it names none, as the status page.
    PERMISSIONS = {'read_state': 'read', 'write_state': 'write', 'lock': 'write', 'unlock': 'write',
                   'delete_state': 'admin', 'show_status': 'admin', 'show_history': 'read',
                   'restore_version': 'admin', 'show_dashboard': 'read',
                   'show_dashboard_environment': 'read', 'force_unlock_from_dashboard': 'admin'}
    # Open to anyone: they reveal no environment, for load balancers and probes.
    OPEN_ACTIONS = ('show_health',)
    # Open to any user who logs in: they reveal no environment, and a
    # metrics scraper needs no rights on any.
    USER_ACTIONS = ('show_metrics',)
    # The actions on no one environment; all others need ?env=NAME.
    SERVER_ACTIONS = ('show_status', 'show_health', 'show_metrics', 'show_dashboard')
    # The actions that change a state, as AUDIT_LOG names them; an UNLOCK
    # with an empty body is a force-unlock.
    AUDITED_ACTIONS = {'write_state': 'write', 'delete_state': 'delete', 'lock': 'lock',
                       'unlock': 'unlock', 'restore_version': 'restore',
                       'force_unlock_from_dashboard': 'force-unlock'}
    # The actions whose replies get DASHBOARD_HEADERS.
    DASHBOARD_ACTIONS = ('show_dashboard', 'show_dashboard_environment', 'force_unlock_from_dashboard')

    # Set per request; these defaults cover requests refused before parsing.
    path = ''
    environment_name = None
    lock_id = None
    user = None
    # Set per connection, from a client certificate (SSL_CLIENT_CERT_USERS).
    certificate_user = None

    def setup(self):
        self.timeout = self.server.constants.REQUEST_TIMEOUT
        if self.server.ssl_context is not None:
            self.start_tls()
        super().setup()

    def start_tls(self):
        """The TLS handshake, counted as waiting for a request: a client that
        stalls in it can be closed to make room (see WaitingConnections)."""
        self.request.settimeout(self.timeout)
        self.request = self.server.ssl_context.wrap_socket(
            self.request, server_side=True, do_handshake_on_connect=False)
        self.server.waiting_connections.add(self)
        try:
            self.request.do_handshake()
        finally:
            self.server.waiting_connections.claim(self)
        self.certificate_user = self.server.access.certificate_user(self.request.getpeercert())

    def handle_one_request(self):
        self.server.waiting_connections.add(self)
        super().handle_one_request()

    def finish(self):
        self.server.waiting_connections.claim(self)
        super().finish()

    def dispatch(self):
        """Answer one request: authenticate, read its body, route it,
        authorize, reply, log it."""
        started = time.monotonic()
        self.environment_name = self.lock_id = self.user = None
        self.released_lock = {}     # what a force-unlock found held, for the audit
        action, body = None, b''
        with self.server.request_in_flight():
            try:
                url = urlsplit(self.path)
                action = self.ROUTES.get(url.path, {}).get(self.command)
                if action not in self.OPEN_ACTIONS:
                    self.user = self.authenticate()
                self.check_before_body(action, url)
                self.send_continue()
                body = self.read_body()
                if _is_force_unlock(action, body):
                    self.authorize(action, 'admin')
                reply = getattr(self, action)(body)
                headers = [('Content-MD5', reply.content_md5)] if reply.content_md5 else []
            except Refusal as refusal:
                reply, headers = text_reply(refusal.status, refusal.reason), refusal.headers
                self.close_connection = self.close_connection or refusal.close
            except tylstore.BackendUnavailable as error:
                log.warning('storage unavailable on %s %s: %s', self.command, _printable(self.path),
                            _one_line(error))
                reply = text_reply(503, _one_line(error))
                headers = [('Retry-After', str(error.retry_after))]
            except Exception as error:
                log.exception('backend error on %s %s', self.command, _printable(self.path))
                reply, headers = text_reply(500, '%s: %s' % (type(error).__name__, _one_line(error))), []
                self.close_connection = True
            if action in self.DASHBOARD_ACTIONS:
                headers = list(headers) + self.dashboard_headers(reply)
            if self.server.stopping:
                self.close_connection = True
            self.send_reply(reply, headers)
        self.log_access(reply, started, action, body)
        if action in self.AUDITED_ACTIONS and self.server.audit_log.enabled:
            self.audit(action, body, reply)

    do_GET = do_POST = do_PUT = do_DELETE = do_LOCK = do_UNLOCK = dispatch

    def refuse_route(self, path):
        actions = self.ROUTES.get(path)
        if actions is None:
            raise Refusal(404, 'no such path: %s' % _printable(path)[:256])
        raise Refusal(405, '%s is not allowed on %s' % (self.command, path),
                      headers=[('Allow', ', '.join(actions))])

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
        self.expects_continue = False
        if not super().parse_request():
            return False
        if len(self.requestline.split()) != 3:
            self.send_error(400, 'request line needs a method, a path and an HTTP version')
            return False
        if not self.server.waiting_connections.claim(self):
            self.close_connection = True    # closed to make room meanwhile
            return False
        return True

    def handle_expect_100(self):
        """Defer `Expect: 100-continue` to `send_continue`: a request refused
        on its headers gets its final answer instead, and its body is never
        sent."""
        self.expects_continue = True
        return True

    def send_continue(self):
        """The deferred 100 Continue, flushed at once: the buffered writer
        would hold it until the reply, and curl waits a second for it."""
        if self.expects_continue:
            self.send_response_only(100)
            self.end_headers()
            self.wfile.flush()

    # -- the actions --------------------------------------------------------

    def read_state(self, body):
        version = self.query_value('version')
        if version is not None:
            return self.environment().read_version(version)
        return self.environment().read_to_send()

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
        environment = self.environment()
        if not body.strip():
            self.released_lock = tylstore.lock_info(environment.lock_holder())
        return environment.unlock(body)

    def show_history(self, body):
        return self.environment().history()

    def restore_version(self, body):
        version = self.query_value('version')
        if not version:
            raise Refusal(400, 'missing &version=V: the version to restore, from /history')
        who = '%s via POST /restore' % (self.user or self.client_address[0])
        return self.environment().restore(version, who)

    def show_health(self, body):
        return self.server.health_check()

    def show_metrics(self, body):
        return Reply(200, self.server.metrics.render(self.server.environments),
                     Metrics.CONTENT_TYPE)

    def show_status(self, body):
        constants = self.server.constants
        status = {
            'backend_module': constants.BACKEND_CLASS,
            'post_processor_modules': constants.POST_PROCESS_CLASSES,
            'environments': [_status_or_error(env) for name, env in self.server.environments.snapshot()
                             if self.server.access.allows(self.user, 'read', name)],
        }
        return Reply(200, json.dumps(status, indent=2).encode('utf-8'), JSON)

    # -- the dashboard --------------------------------------------------------

    def show_dashboard(self, body):
        names = [name for name in dashboard_environment_names(self.server)
                 if self.server.access.allows(self.user, 'read', name)]
        return Reply(200, render_dashboard(self.server, names), HTML)

    def show_dashboard_environment(self, body):
        environment = self.environment()
        token = None
        if self.server.constants.FORCE_UNLOCK and \
                self.server.access.allows(self.user, 'admin', environment.name):
            token = self.server.dashboard.form_token(self.user, environment.name, 'force-unlock')
        chosen = (self.query_value('from'), self.query_value('to'))
        return Reply(200, render_environment_page(self.server, environment, token, chosen), HTML)

    def force_unlock_from_dashboard(self, body):
        """The page's force-unlock form: Terraform's force-unlock, once the
        form is shown to come from that page (see check_form)."""
        self.lock_id = 'force'
        environment = self.environment()
        self.check_form(body, 'force-unlock')
        self.released_lock = tylstore.lock_info(environment.lock_holder())
        environment.force_unlock()
        return Reply(303, b'', None)

    def check_form(self, body, form_action):
        """403 for a form that another site may have made the browser send:
        from another Origin, a cross-site fetch, or without the token that
        the environment's page gave this user for `form_action`.

        The pages' `Referrer-Policy: no-referrer` makes a browser send
        `Origin: null` with their own forms (the Fetch standard), so null
        proves nothing either way; Sec-Fetch-Site and the token still do."""
        origin, host = self.headers.get('Origin'), self.headers.get('Host', '').lower()
        if origin not in (None, 'null') and (not host or origin.lower() not in ('http://' + host,
                                                                                 'https://' + host)):
            raise Refusal(403, 'the form was sent from another origin; nothing was changed')
        if self.headers.get('Sec-Fetch-Site', '').strip().lower() == 'cross-site':
            raise Refusal(403, 'the form was sent from another site; nothing was changed')
        token = self.parse_query(body.decode('ascii', 'replace')).get('csrf_token', [''])[0]
        expected = self.server.dashboard.form_token(self.user, self.environment_name, form_action)
        if not hmac.compare_digest(token.encode('utf-8'), expected.encode('ascii')):
            raise Refusal(403, 'missing or wrong csrf_token: reload the page and try again; '
                               'nothing was changed')

    def dashboard_headers(self, reply):
        """DASHBOARD_HEADERS, and for a form's 303 the environment's page
        to go back to."""
        headers = list(DASHBOARD_HEADERS)
        if reply.status == 303:
            headers.append(('Location', '/ui/env?' + urlencode({'env': self.environment_name})))
        return headers

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
        return self.server.environments[self.environment_name_of_query()]

    def environment_name_of_query(self):
        name = self.query_value('env')
        if name is None:
            raise Refusal(400, 'missing ?env=NAME')
        if not name:
            raise Refusal(400, 'empty ?env=: name an environment')
        if not tylstore.ENVIRONMENT_NAME.fullmatch(name):
            raise Refusal(400, 'bad environment name %s: use 1 to 128 of A-Z a-z 0-9 . _ -, '
                               'starting with a letter or digit' % _printable(name)[:140])
        if name == HEALTH_ENVIRONMENT:
            raise Refusal(400, 'env %s is reserved for /health' % name)
        self.environment_name = name
        return name

    # -- access ---------------------------------------------------------------

    def authenticate(self):
        """The user this request speaks for; None when authentication is off.

        It runs before the body is read, so a stranger cannot make the server
        read MAX_BODY_BYTES; a refused body stays unread, and the connection
        is closed.
        """
        access = self.server.access
        if not access.required:
            return None
        try:
            return access.authenticate(self.headers.get_all('Authorization', []),
                                       self.certificate_user, self.client_address[0])
        except Refusal as refusal:
            refusal.close = refusal.close or self.announces_body()
            raise

    def check_before_body(self, action, url):
        """Refuse what the request line and headers condemn already: an
        unknown route, a bad query or environment name, a body sent to
        /health, a user without the level the action needs, a body framed
        wrongly or announced over MAX_BODY_BYTES.  The body is then never
        read, however large, and the connection is closed."""
        try:
            if action is None:
                self.refuse_route(url.path)
            self.query = self.parse_query(url.query)
            if action in self.OPEN_ACTIONS and self.announces_body():
                raise Refusal(400, '%s %s takes no body' % (self.command, url.path))
            if action not in self.OPEN_ACTIONS + self.USER_ACTIONS:
                self.authorize(action)
            if action not in self.SERVER_ACTIONS:
                self.environment_name_of_query()
            self.framing = self.body_framing()
        except Refusal as refusal:
            refusal.close = refusal.close or self.announces_body()
            raise

    def authorize(self, action, level=None):
        """403 unless the user holds `level`, by default the one `action`
        needs."""
        access = self.server.access
        if not access.required:
            return
        level = level or self.PERMISSIONS[action]
        name = self.environment_name_of_query() if 'env' in self.query else None
        if not access.allows(self.user, level, name):
            raise Refusal(403, 'user %s has no %s access to %s' % (
                _printable(self.user)[:128], level, 'env ' + name if name else 'this server'))

    def announces_body(self):
        return ('Transfer-Encoding' in self.headers
                or self.headers.get('Content-Length', '0').strip() != '0')

    def body_framing(self):
        """How the body comes, from the headers alone: ('chunked', None),
        ('sized', its length) or (None, 0); a 400 or 413 Refusal for one
        framed wrongly or announced over MAX_BODY_BYTES."""
        length = self.headers.get_all('Content-Length', [])
        encoding = self.headers.get_all('Transfer-Encoding', [])
        if encoding and length:
            raise Refusal(400, 'both Content-Length and Transfer-Encoding given', close=True)
        if encoding:
            if [e.strip().lower() for e in encoding] != ['chunked']:
                raise Refusal(400, 'unsupported Transfer-Encoding %s'
                              % _printable(', '.join(encoding)), close=True)
            return 'chunked', None
        if not length:
            return None, 0
        if len(length) > 1 or not re.fullmatch(r'[0-9]{1,20}', length[0].strip()):
            raise Refusal(400, 'bad Content-Length', close=True)
        size = int(length[0])
        if size > self.server.constants.MAX_BODY_BYTES:
            raise Refusal(413, 'body of %d bytes is over MAX_BODY_BYTES (%d)'
                          % (size, self.server.constants.MAX_BODY_BYTES), close=True)
        return 'sized', size

    def read_body(self):
        """The request body, framed as `body_framing` found, within
        MAX_BODY_BYTES.  A malformed body leaves unread bytes on the wire,
        so the connection is closed after the refusal."""
        kind, size = self.framing
        try:
            if kind == 'chunked':
                body = self.read_chunked_body()
            elif size:
                body = self.read_sized_body(size)
            else:
                body = b''
        except socket.timeout:
            raise Refusal(408, 'no body data for %s seconds' % self.timeout, close=True)
        self.check_content_md5(body)
        return body

    def read_sized_body(self, size):
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
        if isinstance(reply.body, StateFile):
            self.wfile.flush()
            reply.body.send(self.connection)
        else:
            self.wfile.write(reply.body)

    _date = (None, None)

    def date_time_string(self, timestamp=None):
        """http.server's Date header, formatted once a second: formatting it
        costs more than the rest of a small reply's headers."""
        if timestamp is not None:
            return super().date_time_string(timestamp)
        second = int(time.time())
        formatted_second, text = TYLRequestHandler._date
        if formatted_second != second:
            text = super().date_time_string(second)
            TYLRequestHandler._date = (second, text)
        return text

    def send_error(self, code, message=None, explain=None):
        """Errors found by http.server itself (bad request line, headers too
        large): one plain line like every other refusal, then close."""
        self.close_connection = True
        reply = text_reply(code, message or self.responses.get(code, ('error',))[0])
        self.send_reply(reply)
        self.log_access(reply, time.monotonic())

    def log_access(self, reply, started, action=None, body=b''):
        """The access log line and the metrics of every reply, in one place."""
        seconds = time.monotonic() - started
        self.server.metrics.record(self.command, action, self.environment_name, body,
                                   reply.status, seconds)
        log.info('%s "%s %s" env=%s status=%d bytes=%d ms=%.1f lock=%s user=%s',
                 self.client_address[0], _printable(str(self.command)), _printable(str(self.path)),
                 self.environment_name or '-', reply.status, len(reply.body),
                 seconds * 1000, _printable(self.lock_id or '-'),
                 _printable(self.user or '-'))

    def audit(self, action, body, reply):
        """The AUDIT_LOG line of a request to change a state.  The lock is
        the one the request names: LockInfo for LOCK and UNLOCK, ?ID= else,
        and for a force-unlock (Terraform's, or the dashboard's form) the
        one it found held."""
        name = self.AUDITED_ACTIONS[action]
        if name == 'force-unlock' or _is_force_unlock(action, body):
            name, lock = 'force-unlock', self.released_lock
        elif action in ('lock', 'unlock'):
            lock = tylstore.lock_info(body)
        else:
            lock = {'ID': self.lock_id}
        written = (None, None)
        if reply.status == 200 and action == 'write_state':
            written = stored_state(body)
        elif reply.status == 200 and action == 'restore_version':
            written = restored_state(reply)
        self.server.audit_log.record(self.client_address[0], self.user, self.environment_name,
                                     name, lock, reply.status, written)

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


def _is_force_unlock(action, body):
    """Whether a request is Terraform's force-unlock: an UNLOCK with no LockInfo."""
    return action == 'unlock' and not body.strip()


def _content_md5(body):
    return base64.b64encode(hashlib.md5(body).digest()).decode('ascii')


def _lock_id_of_body(body):
    return tylstore.lock_id(body) if body.strip() else None


# --------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------

class WaitingConnections(object):
    """The connections waiting for their next request, oldest first.

    Waiting covers the TLS handshake, an idle keep-alive, and a request
    line or headers still arriving.  When every connection slot is taken,
    the connection that has waited longest is closed to make room, so
    sockets that connect and stall cannot starve a real client; a
    connection answering a request is never closed.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._handlers = OrderedDict()

    def add(self, handler):
        with self._lock:
            self._handlers.pop(handler, None)
            self._handlers[handler] = True

    def claim(self, handler):
        """Take `handler` out, as its request starts or its connection ends;
        False when it was closed to make room meanwhile."""
        with self._lock:
            return self._handlers.pop(handler, False)

    def close_oldest(self):
        """Close the connection that has waited longest; False when none waits."""
        with self._lock:
            while self._handlers:
                handler, _ = self._handlers.popitem(last=False)
                try:
                    # socket.socket's own shutdown: an SSLSocket's would
                    # also drop its TLS state under the handler's feet.
                    socket.socket.shutdown(handler.request, socket.SHUT_RDWR)
                except OSError:
                    continue    # closed already
                log.debug('%s closed while waiting, to make room', handler.client_address[0])
                return True
        return False


# Seconds a new connection waits for the slot of one closed to make room.
SLOT_HANDOVER_TIMEOUT = 1.0


class Metrics(object):
    """The counters of GET /metrics, in the Prometheus text format 0.0.4.

    `record` is called once per reply (from `log_access`); one lock guards
    every counter.  No label names an environment: names can be secret,
    and there may be thousands.  tyl_locks_held counts the environments
    whose lock was taken, and not since released, through this server
    process since it started: it is kept from LOCK and UNLOCK replies,
    since asking the storage for every environment's lock at each scrape
    would cost a backend read per environment.  A lock taken or released
    by another server process or by an admin command is not seen.
    Post-processor errors are counted by the post-processors themselves,
    often later on a delivery thread, so they are summed at scrape time.
    """

    CONTENT_TYPE = 'text/plain; version=0.0.4; charset=utf-8'
    BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
    METHODS = ('GET', 'POST', 'PUT', 'DELETE', 'LOCK', 'UNLOCK')
    COUNTERS = (
        ('tyl_lock_conflicts_total', 'LOCK requests refused with 423: another run holds the lock.'),
        ('tyl_force_unlocks_total', "Force-unlocks (UNLOCK with an empty body, or the dashboard's "
                                    'form) that succeeded.'),
        ('tyl_state_writes_total', 'State writes (POST or PUT) stored.'),
        ('tyl_state_write_bytes_total', 'Bytes of the state writes stored.'),
        ('tyl_backend_errors_total', 'Requests answered 500: an error inside the storage plugin.'),
    )

    def __init__(self):
        self._lock = threading.Lock()
        self._requests = defaultdict(int)               # (method, status) -> count
        self._buckets = [0] * (len(self.BUCKETS) + 1)   # per bucket, the last +Inf
        self._duration_sum = 0.0
        self._counters = dict.fromkeys([name for name, _ in self.COUNTERS], 0)
        self._locked = set()                            # environment names, never exported

    def record(self, method, action, environment, body, status, seconds):
        """Count one reply to `method`, routed to `action` (None when
        refused before routing), on `environment` (None when it named none)."""
        method = method if method in self.METHODS else 'other'
        bucket = next((i for i, bound in enumerate(self.BUCKETS) if seconds <= bound),
                      len(self.BUCKETS))
        forced = (action == 'unlock' and status == 200 and not body.strip()
                  or action == 'force_unlock_from_dashboard' and status == 303)
        released = forced or action == 'unlock' and status == 200
        counts = {
            'tyl_lock_conflicts_total': action == 'lock' and status == 423,
            'tyl_force_unlocks_total': forced,
            'tyl_state_writes_total': action == 'write_state' and status == 200,
            'tyl_state_write_bytes_total': len(body) if action == 'write_state' and status == 200 else 0,
            'tyl_backend_errors_total': status == 500,
        }
        with self._lock:
            self._requests[method, status] += 1
            self._buckets[bucket] += 1
            self._duration_sum += seconds
            for name, count in counts.items():
                self._counters[name] += int(count)
            if environment is not None and action == 'lock' and status == 200:
                self._locked.add(environment)
            elif environment is not None and released:
                self._locked.discard(environment)

    def render(self, environments):
        """The exposition text; `environments` (an `Environments`) gives the
        post-processors of every environment this process has served."""
        failures = 0
        for _, environment in environments.snapshot():
            failures += sum(p._logged_errors_ for p in list(environment.post_processors))
            failures += sum(f['num_errors_logged'] for f in list(environment.post_processor_failures))
        with self._lock:
            requests = sorted(self._requests.items())
            buckets, duration_sum = list(self._buckets), self._duration_sum
            counters, locked = dict(self._counters), len(self._locked)
        lines = ['# HELP tyl_requests_total Requests answered, by method and status.',
                 '# TYPE tyl_requests_total counter']
        lines += ['tyl_requests_total{method="%s",status="%d"} %d' % (method, status, count)
                  for (method, status), count in requests]
        lines += ['# HELP tyl_request_duration_seconds Time from a request to its reply.',
                  '# TYPE tyl_request_duration_seconds histogram']
        total = 0
        for bound, count in zip(self.BUCKETS + (math.inf,), buckets):
            total += count
            le = '+Inf' if bound == math.inf else repr(bound)
            lines.append('tyl_request_duration_seconds_bucket{le="%s"} %d' % (le, total))
        lines += ['tyl_request_duration_seconds_sum %r' % duration_sum,
                  'tyl_request_duration_seconds_count %d' % total,
                  '# HELP tyl_locks_held Environments locked through this server process '
                  'and not released since.',
                  '# TYPE tyl_locks_held gauge', 'tyl_locks_held %d' % locked]
        for name, text in self.COUNTERS:
            lines += ['# HELP %s %s' % (name, text), '# TYPE %s counter' % name,
                      '%s %d' % (name, counters[name])]
        lines += ['# HELP tyl_post_processor_errors_total Errors counted by the post-processors '
                  'of the environments this process has served.',
                  '# TYPE tyl_post_processor_errors_total counter',
                  'tyl_post_processor_errors_total %d' % failures]
        return ('\n'.join(lines) + '\n').encode('utf-8')


# The environment /health reads the lock of; it is never written.
HEALTH_ENVIRONMENT = 'tyl-health-check'


class TYLServer(http.server.ThreadingHTTPServer):
    """A thread per connection, at most MAX_CONNECTIONS at once.

    When all are taken, a new connection takes the slot of the one that
    has waited longest for a request; when every one is answering a
    request, it gets an immediate 503 (Terraform retries 5xx).  A flood
    of sockets therefore neither makes the server spawn threads without
    end nor keeps a real client out.
    """

    daemon_threads = True
    request_queue_size = 128

    def __init__(self, plugins):
        constants = plugins.constants
        self.constants = constants
        self.environments = Environments(plugins)
        self.health_environment = Environment(HEALTH_ENVIRONMENT, plugins)
        self.ssl_context = _ssl_context(constants) if constants.USE_SSL else None
        self.access = Access(constants)
        self.audit_log = AuditLog(constants.AUDIT_LOG)
        self.metrics = Metrics()
        self.dashboard = Dashboard()
        self.connection_slots = threading.BoundedSemaphore(constants.MAX_CONNECTIONS)
        self.waiting_connections = WaitingConnections()
        self.stopping = False
        self.config_path = None
        self.log_file = None
        self.loop_alive = time.monotonic()
        self._in_flight = 0
        self._idle = threading.Condition()
        host = constants.BACKEND_SERVICE_IP
        self.address_family = socket.AF_INET6 if ':' in host else socket.AF_INET
        super().__init__((host, constants.BACKEND_SERVICE_PORT), TYLRequestHandler)

    def health_check(self):
        """200 when the storage answers, 503 when it does not; the reply
        names no environment.  The probe reads the lock of a reserved
        environment through the same rules as any request, so it crosses the
        whole path to the storage and changes nothing."""
        try:
            self.health_environment.lock_holder()
        except Exception as error:
            log.warning('health check failed: %s: %s', type(error).__name__, _one_line(error))
            return text_reply(503, 'storage unavailable: %s' % type(error).__name__)
        return text_reply(200, 'ok')

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
        if not self.take_connection_slot():
            _refuse_connection(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.connection_slots.release()
            raise

    def take_connection_slot(self):
        if self.connection_slots.acquire(blocking=False):
            return True
        return (self.waiting_connections.close_oldest()
                and self.connection_slots.acquire(timeout=SLOT_HANDOVER_TIMEOUT))

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

    def service_actions(self):
        """Called by serve_forever at least every poll interval: the
        heartbeat the systemd watchdog checks."""
        super().service_actions()
        self.loop_alive = time.monotonic()

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
    if constants.SSL_CLIENT_CA:
        try:
            context.load_verify_locations(constants.SSL_CLIENT_CA)
        except (OSError, ssl.SSLError) as error:
            raise ConfigError('SSL_CLIENT_CA: cannot load %s: %s' % (constants.SSL_CLIENT_CA, error))
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def _warn_if_exposed(server):
    """Start-up warnings for a server that others can reach unprotected."""
    host = server.server_address[0]
    if ipaddress.ip_address(host.split('%')[0]).is_loopback:
        return
    if not server.access.required:
        log.warning('listening on %s without AUTH_USERS: anyone who can reach it can read and '
                    'change every state', host)
    elif server.ssl_context is None:
        log.warning('listening on %s without USE_SSL: passwords and states cross the network '
                    'in clear text', host)


# systemd's notify protocol (sd_notify(3)), with the stdlib: one datagram
# to the AF_UNIX socket NOTIFY_SOCKET names; nothing without it.

def sd_notify(message):
    """Send `message` to systemd; False when there is no NOTIFY_SOCKET or
    the send failed (logged: the service manager may then time TYL out)."""
    address = os.environ.get('NOTIFY_SOCKET')
    if not address or not hasattr(socket, 'AF_UNIX'):
        return False
    if address.startswith('@'):
        address = '\0' + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(message.encode('utf-8'))
    except OSError as error:
        log.warning('cannot notify systemd at %s: %s', _printable(address), error)
        return False
    return True


def _watchdog_interval():
    """Half of WATCHDOG_USEC in seconds, when systemd asks this process for
    keep-alive pings; else None."""
    if os.environ.get('WATCHDOG_PID', str(os.getpid())) != str(os.getpid()):
        return None
    try:
        usec = int(os.environ.get('WATCHDOG_USEC', ''))
    except ValueError:
        return None
    return usec / 2e6 if usec > 0 else None


def _watchdog(server, interval, stop):
    """WATCHDOG=1 every `interval` s while the serve loop turns: a loop stuck
    longer than the whole watchdog period is left to systemd to restart."""
    while not stop.wait(interval):
        if time.monotonic() - server.loop_alive < 2 * interval + 0.5:
            sd_notify('WATCHDOG=1')


# What SIGHUP reloads; every other key needs a restart.
RELOADABLE_KEYS = ('AUTH_USERS', 'AUTH_GROUPS', 'AUTH_RULES', 'AUTH_ADMINS')


def reload_config(server):
    """SIGHUP: reopen LOG_FILE and AUDIT_LOG, and reload the users and
    rules from the config file.  A config that does not load keeps the ones
    in use."""
    sd_notify('RELOADING=1\nMONOTONIC_USEC=%d' % int(time.monotonic() * 1e6))
    try:
        old = server.constants
        for key, opened in (('LOG_FILE', server.log_file), ('AUDIT_LOG', server.audit_log)):
            path = getattr(old, key)
            if opened is not None and path is not None:
                try:
                    opened.reopen(path)
                except OSError as error:
                    log.error('reload: cannot reopen %s %s, keeping the file open: %s',
                              key, path, error.strerror)
        try:
            new = load_config(server.config_path)
            settings = {key: getattr(old, key) for key in
                        ('USE_SSL', 'SSL_CLIENT_CA', 'SSL_CLIENT_CERT_USERS')}
            settings.update((key, getattr(new, key)) for key in RELOADABLE_KEYS)
            _check_access(settings)
            constants = type('C', (old,), settings)
            access = Access(constants)
        except (ConfigError, ValueError) as error:
            log.error('reload failed, keeping the users and rules in use: %s', _one_line(error))
            return False
        access.failures = server.access.failures
        server.constants, server.access = constants, access
        ignored = [key for key in CONFIG_KEYS if key not in RELOADABLE_KEYS
                   and getattr(new, key) != getattr(old, key)]
        log.info('reload: %d users, %d rules%s', len(access.users), len(access.rules),
                 '; changed but needing a restart: %s' % ', '.join(ignored) if ignored else '')
        return True
    finally:
        sd_notify('READY=1')


def serve(server, shutdown_timeout=9):
    """Serve until SIGTERM or SIGINT, then let requests under way finish and
    the notifications queued be delivered: the process ends within
    `shutdown_timeout` s of the signal, plus one poll interval.  SIGHUP
    reopens the log files and reloads users and rules (see reload_config)."""
    reloading = threading.Lock()
    stopped_at = []

    def request_stop(signum, frame):
        if stopped_at:
            return
        stopped_at.append(time.monotonic())
        server.stopping = True
        threading.Thread(target=stop, args=(signum,), daemon=True).start()

    def stop(signum):
        log.info('signal %d: stopping', signum)
        sd_notify('STOPPING=1')
        server.shutdown()

    def request_reload(signum, frame):
        threading.Thread(target=reload, daemon=True).start()

    def reload():
        with reloading:
            log.info('SIGHUP: reloading users and rules from %s',
                     server.config_path or DEFAULT_CONFIG_PATH)
            reload_config(server)

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    if hasattr(signal, 'SIGHUP'):
        signal.signal(signal.SIGHUP, request_reload)
    interval, watchdog_stop = _watchdog_interval(), threading.Event()
    if interval:
        threading.Thread(target=_watchdog, args=(server, interval, watchdog_stop),
                         daemon=True).start()
    sd_notify('READY=1\nMAINPID=%d' % os.getpid())
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        watchdog_stop.set()
    server.server_close()
    deadline = (stopped_at[0] if stopped_at else time.monotonic()) + shutdown_timeout
    if not server.wait_for_requests(max(deadline - time.monotonic(), 0)):
        log.warning('stopped with requests still under way after %d s', shutdown_timeout)
    undelivered = tylstore.DeliveryQueue.drain_all(deadline)
    if undelivered:
        log.warning('stopped with %d notification(s) undelivered after %d s',
                    undelivered, shutdown_timeout)
    log.info('stopped')


# --------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------

def read_password():
    """A password: typed twice without echo on a terminal, else one line of
    standard input (UTF-8, its line ending dropped)."""
    if sys.stdin.isatty():
        password = getpass.getpass('Password: ')
        if getpass.getpass('Password again: ') != password:
            raise ValueError('the two passwords differ')
    else:
        line = re.sub(rb'\r?\n\Z', b'', sys.stdin.buffer.readline())
        try:
            password = line.decode('utf-8')
        except UnicodeDecodeError:
            raise ValueError('the password is not UTF-8')
    if not password:
        raise ValueError('the password is empty')
    return password


# The admin commands work on the configured storage directly, through the
# same protocol rules as the HTTP handler; they need no running server and
# take the lock like any client, so they are safe beside one.

def add_admin_commands(commands):
    env = dict(type=_environment_name, metavar='ENV', help='environment name')
    command = commands.add_parser('envs', help='list every environment with its lock, serial, '
                                  'size and last write')
    command.set_defaults(run=run_envs)
    command = commands.add_parser('show', help="show an environment's lock and its state's "
                                  'top-level fields')
    command.add_argument('env', **env)
    command.set_defaults(run=run_show)
    command = commands.add_parser('unlock', help="release an environment's lock",
                                  description=run_unlock.__doc__.split('\n\n')[0])
    command.add_argument('env', **env)
    command.add_argument('--id', dest='lock_id', metavar='ID',
                         help="the lock's ID: release it as its holder would; without it, "
                              'force-unlock (see FORCE_UNLOCK)')
    command.set_defaults(run=run_unlock)
    command = commands.add_parser('history', help="list an environment's versions, newest first")
    command.add_argument('env', **env)
    command.add_argument('--json', action='store_true', help='print the JSON of GET /history')
    command.set_defaults(run=run_history)
    command = commands.add_parser('restore', help='store an old version again, as the newest',
                                  description=Environment.restore.__doc__.split('\n\n')[0])
    command.add_argument('env', **env)
    command.add_argument('version', help='a version from `history`')
    command.set_defaults(run=run_restore)
    command = commands.add_parser('export', help="write an environment's state to standard output")
    command.add_argument('env', **env)
    command.add_argument('--version', dest='state_version', metavar='VERSION',
                         help='this version from `history` rather than the current state')
    command.set_defaults(run=run_export)
    command = commands.add_parser('import', help="store a file as an environment's state")
    command.add_argument('env', **env)
    command.add_argument('file', help='the state file; - reads standard input')
    command.set_defaults(run=run_import)
    command = commands.add_parser(
        'migrate', help='copy every environment, with its history, to another backend',
        description='Copy every environment of the configured backend (state, lock, and the '
                    'history when both backends keep one) to another; an environment the target '
                    'holds already is left alone.  Stop the servers on both first.')
    command.add_argument('--to', metavar='CLASS', help='the target backend, as module.Class '
                         "(default: the target config's BACKEND_CLASS)")
    command.add_argument('--config', dest='target_config', metavar='OTHER',
                         help="the target's config file (default: the source's)")
    command.set_defaults(run=run_migrate)
    command = commands.add_parser(
        'systemd-unit', help='print a hardened systemd unit for this installation and config',
        description=run_systemd_unit.__doc__.split('\n\n')[0])
    command.add_argument('--user', default='tyl', help='the user to run as (default: tyl)')
    command.add_argument('--group', help='the group to run as (default: the same as --user)')
    command.set_defaults(run=run_systemd_unit)


# Where each built-in backend writes: (key, whether the key names a file,
# so that its directory must be writable).
BACKEND_DATA_PATHS = {
    'file_backend': [('FILE_DATA_PATH', False)],
    'aes_backend': [('FILE_DATA_PATH', False)],
    'sqlite_backend': [('SQLITE_DB_PATH', True)],
    'pyshelve_backend': [('PYSHELVE_DATA_PATH', False)],
    'git_backend': [('GIT_WORKING_PATH', False)],
    'postgres_backend': [],
}
HOME_DIRECTORIES = ('/home/', '/root/', '/run/user/')


def _backend_data_paths(constants):
    """BACKEND_DATA_PATHS of the configured backend; None for a plugin."""
    return BACKEND_DATA_PATHS.get(constants.BACKEND_CLASS.rpartition('.')[0])


def written_directories(constants):
    """(key, directory) for each directory the configured built-in backend,
    AUDIT_LOG and LOG_FILE write in; a plugin's own are not known."""
    found = [(key, os.path.dirname(getattr(constants, key)) if is_file else getattr(constants, key))
             for key, is_file in _backend_data_paths(constants) or []]
    found += [(key, os.path.dirname(getattr(constants, key)))
              for key in ('AUDIT_LOG', 'LOG_FILE') if getattr(constants, key)]
    return [(key, os.path.normpath(directory)) for key, directory in found]


def check_before_start(constants):
    """Stop start-up, and --check-config, naming the key, for what the
    config's values are wrong about: a log that is a directory, a
    directory where the server could not write.  Reads of
    a missing directory answer "no state", so /health and every GET would
    pass while each LOCK failed.  A temporary file is created and removed
    in the directory, or in its nearest existing parent when it is still to
    be made, which finds what permissions alone do not (a read-only mount,
    /proc, a full quota)."""
    file_keys = [key for key, is_file in _backend_data_paths(constants) or [] if is_file]
    for key in file_keys + ['AUDIT_LOG', 'LOG_FILE']:
        if getattr(constants, key) and os.path.isdir(getattr(constants, key)):
            raise ConfigError('%s: %s is a directory, not a file' % (key, getattr(constants, key)))
    for key, directory in written_directories(constants):
        existing = directory
        while not os.path.lexists(existing):
            existing = os.path.dirname(existing)
        try:
            tempfile.TemporaryFile(dir=existing).close()
        except OSError as error:
            raise ConfigError('%s: cannot write %s: no file can be created in %s (%s)'
                              % (key, directory, existing, error.strerror or error))


def _unit_word(text, exec_line=False):
    """`text` as one word of a unit file line: % (and $ on Exec lines)
    escaped, quoted when it holds blanks, quotes or backslashes."""
    text = text.replace('%', '%%')
    if exec_line:
        text = text.replace('$', '$$')
    if re.search(r'[\s"\'\\]', text):
        text = '"%s"' % text.replace('\\', '\\\\').replace('"', '\\"')
    return text


def run_systemd_unit(args, plugins):
    """Print a hardened systemd unit that runs this tylserver.py, with this
    Python and this config file, as a notify service: it reports ready, pings
    the watchdog, reloads users and rules on `systemctl reload`, and may
    write only to the directories its config stores data in.

    Save it as /etc/systemd/system/tyl.service, then run
    `systemctl daemon-reload && systemctl enable --now tyl`."""
    constants = plugins.constants
    config = constants.CONFIG_FILE
    if config is None:
        raise ConfigError('systemd-unit needs the config file the service will read: there is '
                          'none at %s; pass --config PATH' % DEFAULT_CONFIG_PATH)
    notes = []
    if _backend_data_paths(constants) is None:
        notes.append('# BACKEND_CLASS %s: add the directories it writes to ReadWritePaths.'
                     % constants.BACKEND_CLASS)
    writable = list(OrderedDict.fromkeys(directory for _, directory in written_directories(constants)))
    program = [os.path.abspath(sys.executable), os.path.abspath(__file__), '--config', config]
    # A virtual environment's python is a link to the interpreter it was made from.
    paths = [os.path.realpath(sys.executable)] + program[:2] + [config] + writable
    in_home = [path for path in paths if (path + '/').startswith(HOME_DIRECTORIES)]
    in_tmp = [path for path in paths if (path + '/').startswith(('/tmp/', '/var/tmp/'))]
    if in_home:
        notes.append('# WARNING: under a home directory, which user %s must be able to enter: %s'
                     % (args.user, ', '.join(OrderedDict.fromkeys(in_home))))
    if in_tmp:
        notes.append('# WARNING: PrivateTmp=true hides these from the service; install and keep '
                     'the data elsewhere: %s' % ', '.join(OrderedDict.fromkeys(in_tmp)))
    lines = [
        '# Made by `tylserver.py systemd-unit` for %s.' % config,
        '# Create the ReadWritePaths directories, owned by %s, before starting.' % args.user,
    ] + notes + [
        '[Unit]',
        'Description=TYL Terraform state server',
        'Wants=network-online.target',
        'After=network-online.target',
        '',
        '[Service]',
        'Type=notify',
        'NotifyAccess=main',
        'ExecStart=' + ' '.join(_unit_word(word, exec_line=True) for word in program),
        'ExecReload=/bin/kill -HUP $MAINPID',
        'Restart=on-failure',
        'RestartSec=2',
        'WatchdogSec=30',
        'TimeoutStopSec=15',
        'User=' + args.user,
        'Group=' + (args.group or args.user),
        'UMask=0077',
        'NoNewPrivileges=true',
        'PrivateTmp=true',
        'PrivateDevices=true',
        'ProtectSystem=strict',
        'ProtectHome=%s' % ('read-only' if in_home else 'true'),
        'ProtectKernelTunables=true',
        'ProtectKernelModules=true',
        'ProtectKernelLogs=true',
        'ProtectControlGroups=true',
        'ProtectClock=true',
        'ProtectHostname=true',
        'RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX',
        'RestrictNamespaces=true',
        'RestrictRealtime=true',
        'RestrictSUIDSGID=true',
        'LockPersonality=true',
        'SystemCallArchitectures=native',
    ]
    if writable:
        lines.append('ReadWritePaths=' + ' '.join(_unit_word(path) for path in writable))
    if 0 < constants.BACKEND_SERVICE_PORT < 1024:
        lines += ['AmbientCapabilities=CAP_NET_BIND_SERVICE',
                  'CapabilityBoundingSet=CAP_NET_BIND_SERVICE']
    else:
        lines.append('CapabilityBoundingSet=')
    lines += ['', '[Install]', 'WantedBy=multi-user.target']
    print('\n'.join(lines))
    for note in notes:
        if note.startswith('# WARNING'):
            print('tylserver: %s' % note[2:], file=sys.stderr)
    return 0


def run_admin_command(args, plugins):
    """Run the command `args` names; a refusal, a file it cannot read or
    write, or a backend's error, is one line on standard error and exit
    status 1.  Output piped to a reader that stopped reading (`| head`)
    ends the command quietly, with the shell's status for SIGPIPE."""
    try:
        status = args.run(args, plugins)
        sys.stdout.flush()
        return status
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # for the flush at exit
        return 128 + signal.SIGPIPE
    except Refusal as refusal:
        print('tylserver: %s' % refusal.reason, file=sys.stderr)
    except OSError as error:
        print('tylserver: %s' % _one_line(error), file=sys.stderr)
    except ConfigError:
        raise   # a usage error: main's exit status 2
    except Exception as error:
        print('tylserver: %s: %s' % (type(error).__name__, _one_line(error)), file=sys.stderr)
    return 1


def _lock_field(lock, name, width=80):
    """A LockInfo field as a message shows it: printable, cut to `width`,
    '?' when missing."""
    return _printable(str(lock.get(name) or '?'))[:width]


def _environment_name(text):
    if not tylstore.ENVIRONMENT_NAME.fullmatch(text):
        raise argparse.ArgumentTypeError('bad environment name %r: use 1 to 128 of '
                                         'A-Z a-z 0-9 . _ -, starting with a letter or digit' % text)
    if text == HEALTH_ENVIRONMENT:
        raise argparse.ArgumentTypeError('env %s is reserved for the health check' % text)
    return text


def _command_user():
    """Who runs this command, in Terraform's form of LockInfo's Who."""
    return '%s@%s via tylserver' % (getpass.getuser(), socket.gethostname())


def _audited(plugins, env, action, lock, change, stored=None):
    """The Reply of `change()`, an admin command's change of a state, after
    its AUDIT_LOG line, its user the one running the command; `stored(reply)`
    gives the (serial, sha256) of the state a 200 stored.  A refusal is
    recorded too, and raised."""
    record = functools.partial(AuditLog(plugins.constants.AUDIT_LOG).record, 'cli',
                               getpass.getuser(), env, action, lock)
    try:
        reply = change()
    except Refusal as refusal:
        record(refusal.status)
        raise
    record(reply.status, stored(reply) if stored and reply.status == 200 else (None, None))
    return reply


def _print_table(rows):
    """`rows`, the first the headings, in aligned columns; None shows as '-'."""
    rows = [['-' if value is None else _printable(str(value)) for value in row] for row in rows]
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    for row in rows:
        print('  '.join(value.ljust(width) for value, width in zip(row, widths)).rstrip())


def run_history(args, plugins):
    versions = Environment(args.env, plugins).versions()
    if args.json:
        print(json.dumps(versions, indent=2))
        return 0
    rows = [('VERSION', 'SERIAL', 'CREATED', 'SIZE', 'SHA256', 'WHO', 'LOCK ID')]
    rows += [(v['version'], v['serial'], v['created'], v['size'], _short_digest(v['sha256']),
              v['who'], v['lock_id']) for v in versions]
    _print_table(rows)
    return 0


def _quiet(plugins):
    """`plugins` without post-processors: reading tells nobody anything."""
    return plugins._replace(post_process_classes=[])


def run_envs(args, plugins):
    """A line per environment the backend lists; the serial costs a scan
    of each state, the last write a look at its history."""
    backend_class = plugins.backend_class
    if not backend_class.supports('list_environments'):
        raise Refusal(405, 'BACKEND_CLASS %s cannot list its environments'
                      % plugins.constants.BACKEND_CLASS)
    rows = [('ENV', 'LOCKED BY', 'SINCE', 'SERIAL', 'SIZE', 'LAST WRITE')]
    failures = []
    for name in backend_class.list_environments(plugins.constants):
        try:
            rows.append(_environment_line(Environment(name, _quiet(plugins))))
        except Exception as error:
            failures.append('tylserver: env %s: %s: %s' % (name, type(error).__name__, _one_line(error)))
    _print_table(rows)
    for failure in failures:   # after the table: one broken environment hides no other
        print(failure, file=sys.stderr)
    return 1 if failures else 0


def _environment_line(environment):
    """An `envs` row; a lock without a Who shows as '?' and its ID."""
    held = environment.lock_holder()
    holder = tylstore.lock_info(held)
    who = holder.get('Who') or ('? (ID %s)' % (holder.get('ID') or '?') if held else None)
    state = environment.read().body
    versions = environment.versions() if environment.keeps_history() else []
    return (environment.name, who, holder.get('Created'),
            parse_stored(inspect_state, state, 'state').get('serial') if state else None,
            len(state) if state else None, versions[0]['created'] if versions else None)


def run_show(args, plugins):
    environment = Environment(args.env, _quiet(plugins))
    holder = environment.lock_holder()
    print('lock: %s' % (lock_bytes(holder).decode('utf-8', 'replace') if holder else 'none'))
    state = environment.read().body
    if not state:
        print('state: none')
        return 0
    fields, _ = parse_stored(parse_json_object, state, 'state')
    for field in ('version', 'terraform_version', 'serial', 'lineage'):
        print('%s: %s' % (field, _printable(str(fields.get(field, '-')))))
    print('resource instances: %d' % sum(1 for _ in resource_instances(fields)))
    return 0


def run_unlock(args, plugins):
    """Release an environment's lock: with --id as its holder would (refused
    while another lock is held), without it by force, as Terraform's
    force-unlock, unless FORCE_UNLOCK is false."""
    environment = Environment(args.env, plugins)
    if args.lock_id is None:
        action, lock = 'force-unlock', tylstore.lock_info(environment.lock_holder())
    else:
        action, lock = 'unlock', {'ID': args.lock_id, 'Who': _command_user()}
    body = json.dumps(lock).encode('utf-8') if args.lock_id else b''
    reply = _audited(plugins, args.env, action, lock, lambda: environment.unlock(body))
    if reply.status != 200:
        holder = tylstore.lock_info(reply.body)
        raise Refusal(reply.status, 'env %s is locked by %s with lock %s, not %s; nothing was changed'
                      % (args.env, _lock_field(holder, 'Who'),
                         _lock_field(holder, 'ID'), _printable(args.lock_id)[:80]))
    if action == 'force-unlock' and lock:
        print('env %s is unlocked: lock %s of %s released by force'
              % (args.env, _lock_field(lock, 'ID'), _lock_field(lock, 'Who')))
    else:
        print('env %s is unlocked' % args.env)
    return 0


def run_restore(args, plugins):
    who = _command_user()
    reply = _audited(plugins, args.env, 'restore', {'Who': who},
                     lambda: Environment(args.env, plugins).restore(args.version, who), restored_state)
    if reply.status != 200:
        raise Refusal(reply.status, _one_line(reply.body.decode('utf-8', 'replace')))
    print('restored version %s of env %s as serial %d'
          % (args.version, args.env, json.loads(reply.body)['serial']))
    return 0


def run_export(args, plugins):
    environment = Environment(args.env, plugins)
    if args.state_version is not None:
        reply = environment.read_version(args.state_version)
    else:
        reply = environment.read()
    if reply.status != 200:
        raise Refusal(404, 'env %s has no state' % args.env)
    sys.stdout.buffer.write(reply.body)
    sys.stdout.flush()
    return 0


def run_import(args, plugins):
    if args.file == '-':
        body = sys.stdin.buffer.read()
    else:
        with open(args.file, 'rb') as stream:
            body = stream.read()
    who = _command_user()
    reply = _audited(plugins, args.env, 'write', {'Who': who},
                     lambda: Environment(args.env, plugins).import_state(body, who),
                     lambda reply: stored_state(body))
    if reply.status != 200:
        raise Refusal(reply.status, _one_line(reply.body.decode('utf-8', 'replace')))
    print('imported %s (%d bytes) into env %s' % (args.file, len(body), args.env))
    return 0


def run_migrate(args, plugins):
    """Copy each environment (`Environment.copy_from`), telling post-processors
    nothing.  On a terminal a line per environment shows the progress; piped,
    only problems and the closing summary are printed."""
    source = plugins._replace(post_process_classes=[])
    if not source.backend_class.supports('list_environments'):
        raise ConfigError('BACKEND_CLASS %s cannot list its environments, which migrate needs'
                          % source.constants.BACKEND_CLASS)
    target = _migration_target(args, plugins.constants)
    names = source.backend_class.list_environments(source.constants)
    progress = sys.stderr.isatty()
    copied = already = versions = failed = 0
    for number, name in enumerate(names, 1):
        try:
            if not tylstore.ENVIRONMENT_NAME.fullmatch(name):
                raise Refusal(400, 'not a valid environment name; not copied')
            count = Environment(name, target).copy_from(Environment(name, source))
        except Exception as error:
            reason = error.reason if isinstance(error, Refusal) else '%s: %s' % (
                type(error).__name__, _one_line(error))
            print('tylserver: env %s: %s' % (_printable(name), reason), file=sys.stderr)
            failed += 1
            continue
        if count is None:
            already += 1
        else:
            copied, versions = copied + 1, versions + count
        if progress:
            print('[%d/%d] %s: %s' % (number, len(names), name, 'there already' if count is None
                                      else '%d versions' % count), file=sys.stderr, flush=True)
    print('migrated %d environments (%d versions) from %s to %s; %d there already, %d failed'
          % (copied, versions, source.constants.BACKEND_CLASS, target.constants.BACKEND_CLASS,
             already, failed))
    return 1 if failed else 0


def _migration_target(args, constants):
    """The plugins of the migration's target: --config's, or the source's
    config, with --to's backend class and no post-processors."""
    if args.target_config is None and args.to in (None, constants.BACKEND_CLASS):
        raise ConfigError('migrate needs a target other than the source: --to CLASS, '
                          '--config OTHER or both')
    if args.target_config is not None:
        constants = load_config(args.target_config)
    if args.to is not None:
        constants = type('C', (constants,), {'BACKEND_CLASS': _check_class_name('--to', args.to)})
    return load_plugins(constants)._replace(post_process_classes=[])


def _skip_unlogged_record_fields():
    """Spare every log record what the format never shows: the caller's
    frame, the thread and the process (the logging HOWTO's "Optimization");
    with an access line per request, this is a tenth of a GET's time."""
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False


class ArgumentParser(argparse.ArgumentParser):
    """argparse's, with a hint for the usual slip: `tylserver.py envs
    --config FILE`, where the config belongs before the command."""

    def error(self, message):
        if message.startswith('unrecognized arguments: --config'):
            message += ' (--config goes before the command: tylserver.py --config FILE COMMAND)'
        super().error(message)


def main(argv=None):
    parser = ArgumentParser(prog='tylserver', description=__doc__.split('\n')[0])
    parser.add_argument('--config', help='config file (default: config.yaml beside tylserver.py)')
    parser.add_argument('--check-config', action='store_true',
                        help='load the config and the plugins, report, and exit')
    parser.add_argument('--version', action='version', version='TYL ' + __version__)
    commands = parser.add_subparsers(dest='command', metavar='COMMAND')
    commands.add_parser('hash-password', help='read a password and print its hash for AUTH_USERS',
                        description=read_password.__doc__.split('\n')[0])
    add_admin_commands(commands)
    parser.set_defaults(run=None)
    args = parser.parse_args(argv)
    if args.command == 'hash-password':
        try:
            print(hash_password(read_password()))
        except ValueError as error:
            print('tylserver: error: %s' % error, file=sys.stderr)
            return 2
        return 0
    try:
        constants = load_config(args.config)
        serving = not (args.check_config or args.run)
        if not args.run:
            check_before_start(constants)
        log_file = LogFile(constants.LOG_FILE) if serving and constants.LOG_FILE else None
        logging.basicConfig(level=constants.LOG_LEVEL, handlers=[log_file or logging.StreamHandler()],
                            format='%(asctime)s %(levelname)s %(message)s')
        _skip_unlogged_record_fields()
        plugins = load_plugins(constants)
        if args.check_config:
            if constants.USE_SSL:   # loaded by TYLServer when serving
                _ssl_context(constants)
            print('config OK: backend %s, post-processors [%s], listening address %s:%d, %s'
                  % (constants.BACKEND_CLASS, ', '.join(constants.POST_PROCESS_CLASSES),
                     constants.BACKEND_SERVICE_IP, constants.BACKEND_SERVICE_PORT,
                     'config file ' + constants.CONFIG_FILE if constants.CONFIG_FILE
                     else 'no config file: the defaults, paths relative to ' + constants.CONFIG_DIR))
            return 0
        if args.run:
            return run_admin_command(args, plugins)
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
    _warn_if_exposed(server)
    server.config_path, server.log_file = args.config, log_file
    serve(server)
    return 0


if __name__ == '__main__':
    sys.exit(main())
