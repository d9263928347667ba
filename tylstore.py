"""The TYL plugin contract: everything a storage or notification plugin imports.

A persistent backend subclasses `TYLPersistent`; a post-processor subclasses
`TYLNonpersistent`.  The methods, their arguments and their return values are
those of PyTerraBackTYL's `abc_tylstore` (see custom_backend.rst), so a plugin
written for PyTerraBackTYL loads unchanged; `tylserver` registers this module
under that old name too.

This module imports no server code.  Besides the two base classes it holds
the constants object `C`, `TYLHelpers`, and the small helpers every built-in
store needs: a durable atomic file write and LockInfo parsing.
"""

import abc
import json
import os
import re
import tempfile

__version__ = '1.0.0'


# A valid environment name: the server refuses every other before a
# backend sees it, so a store may use the name in a path or a key.
ENVIRONMENT_NAME = re.compile(r'[A-Za-z0-9][A-Za-z0-9._-]{0,127}')


class C(object):
    """Constants handed to every plugin as `constants`.

    The server builds one subclass of this per configuration, adding every
    key of config.yaml (known or not) as an attribute, so a plugin reads its
    own settings as `constants.MY_PLUGIN_KEY`.
    """

    HTTP_OK = 200
    HTTP_NO_CONTENT = 204
    HTTP_BAD_REQUEST = 400
    HTTP_UNAUTHORIZED = 401
    HTTP_FORBIDDEN = 403
    HTTP_NOT_FOUND = 404
    HTTP_METHOD_NOT_ALLOWED = 405
    HTTP_CONFLICT = 409
    HTTP_PAYLOAD_TOO_LARGE = 413
    HTTP_LOCKED = 423
    HTTP_ERROR = 500
    HTTP_UNAVAILABLE = 503

    HTTP_METHOD_GET = 'GET'
    HTTP_METHOD_POST = 'POST'
    HTTP_METHOD_PUT = 'PUT'
    HTTP_METHOD_DELETE = 'DELETE'
    HTTP_METHOD_LOCK = 'LOCK'
    HTTP_METHOD_UNLOCK = 'UNLOCK'

    LOCK_STATE_LOCKED = 'LOCKED'
    LOCK_STATE_UNLOCKED = 'UNLOCKED'
    LOCK_STATES = {LOCK_STATE_LOCKED: HTTP_LOCKED, LOCK_STATE_UNLOCKED: HTTP_OK}

    TFSTATE_FILE_NAME = 'terraform.tfstate'

    TYL_KEYWORD_BACKEND_MODULE = 'backend_module'
    TYL_KEYWORD_POST_PROCESSORS = 'post_processors'
    TYL_KEYWORD_POST_PROCESSOR_MODULE = 'post_processor_module'
    TYL_KEYWORD_POST_PROCESSOR_MODULES = 'post_processor_modules'
    TYL_KEYWORD_ENVIRONMENTS = 'environments'
    TYL_KEYWORD_ENVIRONMENT_NAME = 'environment_name'
    TYL_KEYWORD_LOCK_STATE = 'lock_state'
    TYL_KEYWORD_HTTP_STATE = 'http_state'
    TYL_KEYWORD_LOGGED_ERROR_CT = 'num_errors_logged'
    TYL_KEYWORD_RECENT_LOGGED_ERROR = 'recent_logged_error'
    TYL_KEYWORD_BACKEND_STATUS = 'backend_status'

    HELPER_HOSTNAME_QUERY_MAP = {}


class TYLPersistent(abc.ABC):
    """A store for one environment's state and lock.

    The server creates one instance per environment and never calls two of
    its methods at the same time, so a plugin need not be thread-safe.  It
    may still share its storage with another server process: `set_locked`
    must then be atomic against that process too.

    Errors are not to be caught: an exception reaches Terraform as a 500
    with its message, which stops the run and tells the user.
    """

    # True for a backend that stores the exact bytes received.  The server
    # then passes them as `raw_bytes` to set_locked, set_unlocked and
    # store_tfstate; store_tfstate also gets `metadata` (serial, lineage,
    # size, sha256, created, lock_id, who: what a history records), and its
    # `tfstate_obj` is None unless post-processors needed the state
    # unpacked anyway, which spares unpacking a large state.  Plugins
    # written for PyTerraBackTYL never see any of this.
    RAW_BYTES = False

    @abc.abstractmethod
    def __init__(self, environment, constants, **kwargs):
        """`environment` names this instance's environment for its whole
        life; `constants` is the `C` built from config.yaml."""

    @abc.abstractmethod
    def set_locked(self, state_obj, **kwargs):
        """Take the lock described by `state_obj` (LockInfo as a dict;
        `raw` in kwargs is the JSON text, `raw_bytes` the bytes received).
        Return true on success, false when someone else holds the lock."""

    @abc.abstractmethod
    def set_unlocked(self, state_obj, **kwargs):
        """Release the lock.  `state_obj` is the unlocking LockInfo, or an
        empty dict for Terraform's force-unlock, which sends no ID.  Return
        true on success, false when the environment was not locked."""

    @abc.abstractmethod
    def get_lock_state(self):
        """Return the stored lock (the text or object given to
        `set_locked`), or an empty string when no lock is held."""

    @abc.abstractmethod
    def store_tfstate(self, tfstate_obj, **kwargs):
        """Store the state `tfstate_obj` (a dict; `raw` in kwargs is the
        JSON text, `raw_bytes` the bytes received).  Return nothing."""

    @abc.abstractmethod
    def get_tfstate(self):
        """Return the stored state as text, bytes or a JSON-compatible
        object; an empty value means there is no state yet."""

    def backend_status(self):
        """Optional: health and status information, JSON-compatible."""
        return None

    def delete_tfstate(self, **kwargs):
        """Optional: remove the stored state.  A backend that does not
        override this answers DELETE with 405."""
        raise NotImplementedError('%s cannot delete state' % type(self).__name__)

    @classmethod
    def supports(cls, method_name):
        """Whether this backend overrides the optional method `method_name`."""
        return getattr(cls, method_name) is not getattr(TYLPersistent, method_name)


class TYLNonpersistent(abc.ABC):
    """A post-processor: told about locks and writes after the persistent
    backend accepted them.  Its errors are counted and logged; they never
    change what Terraform is told."""

    _logged_errors_ = 0
    _recent_error_ = ''

    @abc.abstractmethod
    def __init__(self, environment, constants, **kwargs):
        """As `TYLPersistent.__init__`."""

    @abc.abstractmethod
    def on_locked(self, state_obj, **kwargs):
        """The environment was locked with LockInfo `state_obj`."""

    @abc.abstractmethod
    def on_unlocked(self, state_obj, **kwargs):
        """The environment was unlocked (`state_obj` is empty on force-unlock)."""

    @abc.abstractmethod
    def process_tfstate(self, tfstate_obj, **kwargs):
        """A new state `tfstate_obj` was stored."""

    def post_processor_status(self):
        """Optional: health and status information, JSON-compatible."""
        return None


class TYLHelpers(object):
    @classmethod
    def get_hostnames_from_tfstate(cls, tfstate, query_map=None):
        """The host names a state's resources carry.

        `query_map` (default `C.HELPER_HOSTNAME_QUERY_MAP`) maps a resource
        type to the attribute holding the host name.  A PyTerraBackTYL
        JSONPath value is read for its last field name, so old maps keep
        working.  Reads version-4 state and the older version-3 state.
        """
        if isinstance(tfstate, (str, bytes)):
            tfstate = json.loads(tfstate) if tfstate else {}
        query_map = C.HELPER_HOSTNAME_QUERY_MAP if query_map is None else query_map
        wanted = {rtype: _last_field_name(query) for rtype, query in query_map.items()}
        hosts = []
        for rtype, attributes in _resource_attributes(tfstate or {}):
            attribute = wanted.get(rtype)
            if attribute and attributes.get(attribute):
                hosts.append(attributes[attribute])
        return hosts


def _last_field_name(query):
    return query.replace('[', '.').replace(']', '.').rstrip('.*').split('.')[-1]


def _resource_attributes(tfstate):
    """Yield (resource type, attributes) for every resource instance."""
    for resource in tfstate.get('resources') or []:
        for instance in resource.get('instances') or []:
            yield resource.get('type'), instance.get('attributes') or {}
    for module in tfstate.get('modules') or []:
        for resource in (module.get('resources') or {}).values():
            yield resource.get('type'), (resource.get('primary') or {}).get('attributes') or {}


def lock_info(lock):
    """A stored lock (text, bytes or dict) as a dict; {} when there is none
    or it is not a JSON object."""
    if isinstance(lock, (str, bytes)):
        try:
            lock = json.loads(lock) if lock else {}
        except ValueError:
            return {}
    return lock if isinstance(lock, dict) else {}


def lock_id(lock):
    """The `ID` of a stored lock (text, bytes or dict); '' when there is none."""
    found = lock_info(lock).get('ID')
    return found if isinstance(found, str) else ''


def fsync_path(path):
    """Flush a file, or a directory (making a rename or unlink in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_temporary_file(directory, data):
    """Write `data` to a new fsynced 0600 file in `directory`; return its path."""
    fd, temporary = tempfile.mkstemp(dir=directory, prefix='.tmp-')
    try:
        with os.fdopen(fd, 'wb') as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
    except BaseException:
        os.unlink(temporary)
        raise
    return temporary


def write_file_durably(path, data):
    """Replace the file `path` with `data` (bytes) atomically and durably.

    Readers see the old content or the new, never a mixture, and once this
    returns the new content survives a crash: temporary file, fsync,
    rename over the target, fsync of the directory.  The file is 0600.
    """
    directory = os.path.dirname(path) or '.'
    temporary = _write_temporary_file(directory, data)
    try:
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise
    fsync_path(directory)


def create_file_durably(path, data):
    """Create the file `path` holding `data`, only if it does not exist.

    Returns False when it already exists.  The content is complete before
    the name appears (written to a temporary file, then hard-linked, which
    fails atomically on an existing name), so no reader and no crash ever
    sees an empty or partial file; two processes racing here exclude each
    other exactly like O_CREAT|O_EXCL.
    """
    directory = os.path.dirname(path) or '.'
    temporary = _write_temporary_file(directory, data)
    try:
        os.link(temporary, path)
    except FileExistsError:
        return False
    finally:
        os.unlink(temporary)
    fsync_path(directory)
    return True
