"""The TYL plugin contract: everything a storage or notification plugin imports.

A persistent backend subclasses `TYLPersistent`; a post-processor subclasses
`TYLNonpersistent`.  The methods, their arguments and their return values are
those of PyTerraBackTYL's `abc_tylstore` (its custom_backend.rst), so a plugin
written for PyTerraBackTYL loads unchanged; `tylserver` registers this module
under that old name too.

This module imports no server code.  Besides the two base classes it holds
the constants object `C`, `TYLHelpers`, the small helpers every built-in
store needs (a durable atomic file write and LockInfo parsing), and
`DeliveryQueue`, which every notifier needs to post without delaying Terraform.
"""

import abc
import collections
import inspect
import json
import logging
import os
import re
import tempfile
import threading
import time
import urllib.error
import urllib.request

__version__ = '1.0.0'

log = logging.getLogger('tyl')


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


class BackendUnavailable(Exception):
    """Raised by a backend whose storage is out of reach for now (a database
    down or failing over).  The server answers 503 with this one-line
    message and `Retry-After: retry_after`, and Terraform retries, so a
    short outage costs a pause instead of a failed run."""

    def __init__(self, reason, retry_after=2):
        super().__init__(reason)
        self.retry_after = retry_after


class LockChanged(BackendUnavailable):
    """Raised by a store_tfstate that, checking the lock again as it stores,
    finds another than the one the server saw (`holder_id`): a server
    process sharing the storage released or took the lock meanwhile.
    Nothing is stored; the 503 makes Terraform retry, and the retry gets
    the answer for the new lock (423 or 409)."""

    def __init__(self, environment):
        super().__init__('the lock of env %s changed while this write was on its way; nothing '
                         'was stored, and a retry gets the answer for the new lock' % environment,
                         retry_after=1)


class TYLPersistent(abc.ABC):
    """A store for one environment's state and lock.

    The server creates one instance per environment and never calls two of
    its methods at the same time, so a plugin need not be thread-safe.  It
    may still share its storage with another server process: `set_locked`
    must then be atomic against that process too.

    Errors are not to be caught: an exception reaches Terraform as a 500
    with its message, which stops the run and tells the user.  Storage
    that is out of reach for now raises `BackendUnavailable` instead.
    """

    # True for a backend that stores the exact bytes received.  The server
    # then passes them as `raw_bytes` to set_locked, set_unlocked and
    # store_tfstate; store_tfstate also gets `metadata` (serial, lineage,
    # size, sha256, created, lock_id, who: what a history records) and
    # `holder_id`, the ID of the lock the server found held ('' for none),
    # for a store shared by several servers to check again in the
    # transaction that stores.  Its `tfstate_obj` is None unless
    # post-processors needed the state unpacked anyway, which spares
    # unpacking a large state.  Plugins written for PyTerraBackTYL never
    # see any of this.
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
        override this answers DELETE with 405.  A RAW_BYTES backend gets
        `holder_id` as store_tfstate does, to check again."""
        raise NotImplementedError('%s cannot delete state' % type(self).__name__)

    def open_tfstate(self):
        """Optional: the stored state as a binary file open for reading, or
        None when there is none, for a backend whose state is a file holding
        exactly the bytes received and replaced whole, never rewritten in
        place.  The server then sends it from the file, without reading a
        large state into memory, and computes its Content-MD5 once per file.
        Such a backend's store_tfstate may return the os.stat of the file it
        stored (the same file, as open_tfstate would open it, not one put in
        its place since): the server then keeps the MD5 of the bytes it
        received for it, and need not hash the file at all."""
        raise NotImplementedError('%s keeps no state file' % type(self).__name__)

    # History: a backend that overrides list_versions and get_version keeps
    # every state it stores as a version, with the `metadata` store_tfstate
    # received, within constants.HISTORY_KEEP (the newest so many; 0 keeps
    # none) and constants.HISTORY_KEEP_DAYS (0 or None: no age limit; the
    # newest version is kept whatever its age).  Without them, /history
    # answers 404 and `tylserver.py restore` refuses.

    def list_versions(self):
        """Optional: the versions kept, newest first, as dicts: `version`,
        the identifier get_version takes (a string), and the metadata the
        version was stored with (serial, lineage, size, sha256, created,
        lock_id, who)."""
        raise NotImplementedError('%s keeps no history' % type(self).__name__)

    def get_version(self, version):
        """Optional: the exact bytes of version `version`, or None when
        there is no such version.  `version` comes from a request
        unchecked: any text that list_versions did not give is unknown."""
        raise NotImplementedError('%s keeps no history' % type(self).__name__)

    @classmethod
    def list_environments(cls, constants):
        """Optional: the names of the environments with anything stored
        under `constants`, sorted; `tylserver.py migrate` copies these."""
        raise NotImplementedError('%s cannot list its environments' % cls.__name__)

    @classmethod
    def supports(cls, method_name):
        """Whether this backend overrides the optional method `method_name`."""
        return inspect.getattr_static(cls, method_name) is not \
            inspect.getattr_static(TYLPersistent, method_name)


# Guards every post-processor's error count: a delivery thread and a
# request thread may count errors of the same instance at once.
_ERROR_COUNT_LOCK = threading.Lock()


class TYLNonpersistent(abc.ABC):
    """A post-processor: told about locks and writes after the persistent
    backend accepted them.  Its errors are counted and logged; they never
    change what Terraform is told."""

    _logged_errors_ = 0
    _recent_error_ = ''

    # True for a post-processor that wants `lock_info` in kwargs: the
    # LockInfo (a dict) of the lock taken, released or force-released, or
    # held by the writer ({} for a write without a lock).  It comes from
    # the store, so it is right even when the lock was taken before a
    # restart or through another server process.  Plugins written for
    # PyTerraBackTYL never see it.
    LOCK_INFO = False

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

    def log_error(self, message):
        """Count an error and keep `message` as the most recent; GET /state
        shows both.  Safe from any thread."""
        with _ERROR_COUNT_LOCK:
            self._logged_errors_ += 1
            self._recent_error_ = message


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


class DeliveryQueue(object):
    """HTTP POSTs delivered in order by one background thread, so that a
    slow or dead receiver never delays or fails a Terraform request.

    Post-processors exist per environment; `shared` hands every instance of
    a class the same queue, so 10,000 environments still cost one thread
    per class, and one class's dead receiver cannot hold up another's.

    - Bounded: at most `size` posts wait.  When full, the oldest is dropped,
      since after an outage the latest events say most about the present.
    - Retried: `attempts` tries, waiting `retry_delay`, then twice that, and
      so on.  A 4xx other than 408 or 429 is final at once.
    - Timed out: `timeout` seconds per connect and per read of each try
      (urllib's socket timeout; a receiver answering a byte at a time can
      stretch a try, and a name lookup is not covered).
    - Counted: a post dropped, or failed after its tries, is an error of the
      post-processor that sent it (`log_error`), shown in GET /state.
    - Drained: on SIGTERM the server lets every queue deliver until its
      shutdown deadline (`drain_all`); posts left after it are lost.
    """

    _shared = {}
    _shared_lock = threading.Lock()

    def __init__(self, name, size, attempts, timeout, retry_delay):
        self.name = name
        self.size = size
        self.attempts = attempts
        self.timeout = timeout
        self.retry_delay = retry_delay
        self.counts = {'delivered': 0, 'failed': 0, 'dropped': 0}
        self._pending = collections.deque()
        self._delivering = False
        self._changed = threading.Condition()
        threading.Thread(target=self._deliver_forever, name='delivery ' + name, daemon=True).start()

    @classmethod
    def shared(cls, name, constants):
        """The process's queue called `name`, made on first use from the
        NOTIFY_* keys of `constants`."""
        with cls._shared_lock:
            if name not in cls._shared:
                cls._shared[name] = cls(name, constants.NOTIFY_QUEUE_SIZE, constants.NOTIFY_ATTEMPTS,
                                        constants.NOTIFY_TIMEOUT, constants.NOTIFY_RETRY_DELAY)
            return cls._shared[name]

    @classmethod
    def drain_all(cls, deadline):
        """`drain` every shared queue, all by the same `deadline`; the number
        of posts left undelivered in them."""
        with cls._shared_lock:
            queues = list(cls._shared.values())
        return sum(queue.drain(deadline) for queue in queues)

    def post(self, sender, url, body, headers):
        """Queue a POST of `body` (bytes) to `url` and return at once;
        `sender` (a TYLNonpersistent) is told of its failure."""
        request = urllib.request.Request(url, data=body, headers=headers, method='POST')
        request.add_header('User-Agent', 'TYL/' + __version__)
        dropped = None
        with self._changed:
            if len(self._pending) >= self.size:
                dropped = self._pending.popleft()[0]
                self.counts['dropped'] += 1
            self._pending.append((sender, request))
            self._changed.notify_all()
        if dropped is not None:
            self._fail(dropped, 'dropped: the %s queue of %d was full' % (self.name, self.size))

    def status(self):
        """Posts waiting now, and delivered, failed and dropped so far."""
        with self._changed:
            return dict(self.counts, queued=len(self._pending))

    def drain(self, deadline):
        """Wait until every post queued has been delivered or given up on, or
        until `deadline` (a time.monotonic() value), so that an exit loses
        none that a working receiver could take; the number left."""
        with self._changed:
            self._changed.wait_for(lambda: not (self._pending or self._delivering),
                                   max(deadline - time.monotonic(), 0))
            return len(self._pending) + int(self._delivering)

    def _deliver_forever(self):
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self._pending)
                sender, request = self._pending.popleft()
                self._delivering = True
            error = self._deliver(request)
            with self._changed:
                self.counts['failed' if error else 'delivered'] += 1
                self._delivering = False
                self._changed.notify_all()
            if error:
                self._fail(sender, 'delivery failed ' + error)

    def _deliver(self, request):
        """Post `request`, retrying; '' once delivered, else why not."""
        for attempt in range(1, self.attempts + 1):
            try:
                urllib.request.urlopen(request, timeout=self.timeout).close()
                return ''
            except Exception as error:  # the thread must survive any receiver
                failure = 'after %d attempt(s): %s: %s' % (attempt, type(error).__name__, error)
                if isinstance(error, urllib.error.HTTPError):
                    error.close()
                    if 400 <= error.code < 500 and error.code not in (408, 429):
                        break
            if attempt < self.attempts:
                time.sleep(self.retry_delay * 2 ** (attempt - 1))
        return failure

    def _fail(self, sender, message):
        log.warning('%s: %s', type(sender).__name__, message)
        sender.log_error(message)


def lock_info(lock):
    """A stored lock (text, bytes or dict) as a dict; {} when there is none
    or it is not a JSON object (nor one Python can parse: too deeply nested)."""
    if isinstance(lock, (str, bytes)):
        try:
            lock = json.loads(lock) if lock else {}
        except (ValueError, RecursionError):
            return {}
    return lock if isinstance(lock, dict) else {}


def lock_id(lock):
    """The `ID` of a stored lock (text, bytes or dict); '' when there is none."""
    found = lock_info(lock).get('ID')
    return found if isinstance(found, str) else ''


# The form of a version's `created`: UTC to the second, so that two such
# times compare as strings.
CREATED_FORMAT = '%Y-%m-%dT%H:%M:%SZ'


def history_cutoff(constants):
    """The `created` before which a version is older than HISTORY_KEEP_DAYS,
    or None when there is no age limit."""
    if not constants.HISTORY_KEEP_DAYS:
        return None
    oldest = time.time() - constants.HISTORY_KEEP_DAYS * 86400
    return time.strftime(CREATED_FORMAT, time.gmtime(oldest))


def fsync_path(path):
    """Flush a file, or a directory (making a rename or unlink in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_all(fd, data):
    """Write all of `data` to the file descriptor `fd`: a write may take
    less than it is given.  A descriptor rather than a file object, which
    would cost a system call more to make, and one more each call gives
    the GIL up to the server's other threads."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def read_all(fd):
    """The bytes of the file descriptor `fd`, from its position to the end,
    in as few system calls as the standard library's readall, or fewer:
    a regular file's read returns less than asked only at its end."""
    wanted = os.fstat(fd).st_size + 1
    chunks = [os.read(fd, wanted)]
    while len(chunks[-1]) == wanted:  # the file grew since fstat
        wanted = 1024 * 1024
        chunks.append(os.read(fd, wanted))
    return b''.join(chunks)


# How the names of write_temporary_file's files begin.
TEMPORARY_PREFIX = '.tmp-'


def write_temporary_file(directory, data):
    """Write `data` to a new fsynced 0600 file in `directory`; return its path."""
    fd, temporary = tempfile.mkstemp(dir=directory, prefix=TEMPORARY_PREFIX)
    try:
        try:
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
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
    temporary = write_temporary_file(directory, data)
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
    temporary = write_temporary_file(directory, data)
    try:
        os.link(temporary, path)
    except FileExistsError:
        return False
    finally:
        os.unlink(temporary)
    fsync_path(directory)
    return True
