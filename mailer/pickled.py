"""Reading pickled rows (2.3.2's stored form) through an unpickler that hands out only listed classes and functions.

Pickle can call anything it can name, so a row written by whoever can write
the queue table is read here by :class:`SafeUnpickler`, a subclass of the
pure-Python unpickler whose every opcode that reaches outside the data is
checked:

* a global (``GLOBAL``, ``STACK_GLOBAL``, ``INST``) resolves only through a
  fixed table of exact names, built by this module from modules it names
  itself: never a module object, never a name reached through a module's
  attributes, never an import of a module named by the data;
* a name that is not in the table becomes an inert placeholder
  (:class:`StoredConnection`), accepted only as the connection of the stored
  message (2.3.2 pickled ``mailer.backend.DbBackend`` there; any email
  backend class may be found there) and refused anywhere else, naming it;
* ``BUILD`` (setting state) works only on an instance created by this load,
  never on a class, module or function; ``REDUCE``/``NEWOBJ`` call only what
  the table handed out;
* copyreg extension codes and persistent ids are refused.

``MAILER_PICKLE_ALLOWLIST`` adds exact classes (``"pkg.mod.Class"``,
imported by this module from the setting, never from the data). Its older
``"pkg.mod.*"`` form imports nothing: it allows classes defined in
``pkg.mod`` (or a submodule) only when that module is already imported.
"""

from __future__ import annotations

import _compat_pickle
import copyreg
import datetime
import functools
import importlib
import io
import pickle
import re
import string
import sys
import types
import zoneinfo
from typing import Any

from mailer.conf import conf

__all__ = ["RefusedClass", "SafeUnpickler", "StoredConnection", "safe_loads"]


class RefusedClass(pickle.UnpicklingError):
    """Stored data names a class or function that is not on the allow-list,
    or does something with it that a message's pickle never does."""

    def __init__(self, dotted: str, problem: str | None = None) -> None:
        self.dotted = dotted
        if problem is None:
            problem = (
                f"{dotted} is not allowed in stored messages; if this is your own trusted "
                f'class, add "{dotted}" to MAILER_PICKLE_ALLOWLIST.'
            )
        super().__init__(problem)


class StoredConnection:
    """Stands in for an email backend (or any unlisted class) found in stored
    data; does nothing. ``dotted``: the name the data gave."""

    dotted = "an email backend"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass


# --- the table of exact names ------------------------------------------------------

#: Modules of the email package whose own classes a pickled message may hold
#: (MIME parts, their policies, charsets, headers and header parse trees).
_EMAIL_MODULES = (
    "email.message",
    "email.mime.base",
    "email.mime.nonmultipart",
    "email.mime.multipart",
    "email.mime.text",
    "email.mime.image",
    "email.mime.audio",
    "email.mime.application",
    "email.mime.message",
    "email.charset",
    "email.header",
    "email.headerregistry",
    "email._header_value_parser",
    "email.policy",
    "email._policybase",
    "email.contentmanager",
    "email.errors",
)
_BUILTINS = (
    "object",
    "dict",
    "list",
    "tuple",
    "set",
    "frozenset",
    "str",
    "bytes",
    "bytearray",
    "int",
    "float",
    "complex",
    "bool",
)
#: Single names, "module.name" (each looked up in its module's namespace;
#: missing ones, e.g. classes an older Django had, are left out).
_NAMES = (
    "django.core.mail.message.EmailMessage",
    "django.core.mail.message.EmailMultiAlternatives",
    "django.core.mail.message.EmailAlternative",
    "django.core.mail.message.EmailAttachment",
    "django.core.mail.message.SafeMIMEText",
    "django.core.mail.message.SafeMIMEMultipart",
    "django.core.mail.message.SafeMIMEMessage",
    "django.core.mail.message.MIMEMixin",
    "django.core.mail.utils.CachedDnsName",
    "email.headerregistry._reconstruct_header",
    "collections.OrderedDict",
    "datetime.datetime",
    "datetime.date",
    "datetime.time",
    "datetime.timedelta",
    "datetime.timezone",
    "zoneinfo.ZoneInfo",
    "django.utils.safestring.SafeString",
    "django.utils.safestring.SafeText",
    "django.utils.safestring.SafeData",
    "django.utils.translation.gettext",
    "django.utils.translation.ngettext",
    "django.utils.translation.pgettext",
    "django.utils.translation.npgettext",
    "django.utils.translation.ugettext",
    "django.utils.translation.ungettext",
    "anymail.message.AnymailMessage",
    "anymail.message.AnymailMessageMixin",
    "anymail.message.AnymailStatus",
    "anymail.message.AnymailRecipientStatus",
    "anymail.utils.UNSET",
    "mailer.attachments.StoredAttachment",
)


def _latin1_encode(text: Any, encoding: str = "utf-8") -> bytes:
    """``_codecs.encode`` as pickle protocols < 3 use it for bytes: latin-1
    only (any other codec name would be looked up, which imports)."""
    if type(text) is not str or encoding not in ("latin1", "latin-1"):
        raise RefusedClass("_codecs.encode", "_codecs.encode is allowed only for latin-1 text")
    return text.encode("latin-1")


def _reconstructor(cls: Any, base: Any, state: Any) -> Any:
    """``copyreg._reconstructor`` (protocols 0-1) for listed classes only."""
    if not (isinstance(cls, type) and isinstance(base, type)) or not issubclass(cls, base):
        raise RefusedClass("copyreg._reconstructor", "copyreg._reconstructor: bad arguments")
    return copyreg._reconstructor(cls, base, state)  # type: ignore[attr-defined]


@functools.cache
def _zone_keys() -> frozenset[str]:
    return frozenset(zoneinfo.available_timezones())


def _zone_unpickle(key: Any, from_cache: Any = 1) -> zoneinfo.ZoneInfo:
    """``ZoneInfo._unpickle`` for the zones this system knows (a key names a
    file, or a module of the tzdata package)."""
    if type(key) is not str or key not in _zone_keys():
        raise RefusedClass("zoneinfo.ZoneInfo._unpickle", f"unknown time zone {key!r}")
    return zoneinfo.ZoneInfo(key) if from_cache else zoneinfo.ZoneInfo.no_cache(key)


def _getattr(obj: Any, name: Any) -> Any:
    """``getattr`` as protocols < 4 use it for ``ZoneInfo._unpickle`` only."""
    if obj is zoneinfo.ZoneInfo and name == "_unpickle":
        return _zone_unpickle
    raise RefusedClass("builtins.getattr", "builtins.getattr is allowed only for ZoneInfo")


def _translations() -> frozenset[Any]:
    from django.utils import translation

    return frozenset(
        getattr(translation, n) for n in ("gettext", "ngettext", "pgettext", "npgettext")
    )


def _lazy_proxy_unpickle(func: Any, args: Any, kwargs: Any, *resultclasses: Any) -> Any:
    """A lazy string: only Django's translation functions and ``format_lazy``."""
    from django.utils.functional import lazy

    if func not in _translations() and func is not _format_lazy:
        raise RefusedClass("django.utils.functional._lazy_proxy_unpickle", "a lazy object "
                           "of another function than Django's translations")
    if not set(resultclasses) <= {str, bytes} or type(args) is not tuple:
        raise RefusedClass("django.utils.functional._lazy_proxy_unpickle", "bad lazy string")
    return lazy(func, *resultclasses)(*args, **(kwargs if type(kwargs) is dict else {}))


_FIELD = re.compile(r"\w*\Z")


def _format_lazy(format_string: Any, *args: Any, **kwargs: Any) -> str:
    """``django.utils.text._format_lazy`` with plain fields only: ``{0.attr}``
    or ``{0[key]}`` would read the process's objects into the message."""
    text = str(format_string)
    for _literal, field, spec, _conv in string.Formatter().parse(text):
        if field is not None and (not _FIELD.match(field) or (spec and "{" in spec)):
            raise RefusedClass("django.utils.text._format_lazy", f"format field {field!r}")
    return text.format(*args, **kwargs)


#: Names whose stand-ins are ours (they check their arguments).
_SUBSTITUTES: dict[str, Any] = {
    "_codecs.encode": _latin1_encode,
    "copyreg._reconstructor": _reconstructor,
    "zoneinfo.ZoneInfo._unpickle": _zone_unpickle,
    "builtins.getattr": _getattr,
    "django.utils.functional._lazy_proxy_unpickle": _lazy_proxy_unpickle,
    "django.utils.text._format_lazy": _format_lazy,
}


#: Ours, so callable wherever the data got them (``getattr`` gives one).
_SUBSTITUTE_IDS = frozenset(id(f) for f in _SUBSTITUTES.values())


def _lookup(dotted: str) -> Any:
    module_name, _, name = dotted.rpartition(".")
    module = importlib.import_module(module_name)  # named here, never by the data
    return vars(module).get(name)


@functools.cache
def _base_table() -> dict[str, Any]:
    import builtins

    table: dict[str, Any] = {}

    for name in _BUILTINS:
        table[f"builtins.{name}"] = getattr(builtins, name)
    for module_name in _EMAIL_MODULES:
        module = importlib.import_module(module_name)
        for name, value in vars(module).items():
            if isinstance(value, type) and value.__module__ == module_name:
                table[f"{module_name}.{name}"] = value
    for dotted in _NAMES:
        if dotted.startswith("anymail."):
            continue  # looked up when a row names it (django-anymail imports requests)
        try:
            value = _lookup(dotted)
        except ImportError:  # django-anymail not installed
            continue
        if value is not None and not isinstance(value, types.ModuleType):
            table[dotted] = value
    table.update(_SUBSTITUTES)
    return table


_LAZY_NAMES = frozenset(n for n in _NAMES if n.startswith("anymail."))


@functools.cache
def _lazy_name(dotted: str) -> Any:
    try:
        value = _lookup(dotted)
    except ImportError:  # django-anymail not installed
        return None
    return value if isinstance(value, type) else None


@functools.cache
def _extra_table(extra: tuple[str, ...]) -> dict[str, Any]:
    """Exact classes named by ``MAILER_PICKLE_ALLOWLIST`` (wildcards are
    looked up at each use, in already imported modules only)."""
    table: dict[str, Any] = {}
    for dotted in extra:
        if dotted.endswith(".*") or "." not in dotted:
            continue
        try:
            value = _lookup(dotted)
        except ImportError:
            continue
        if isinstance(value, type):
            table[dotted] = value
    return table


def _wildcard_class(module: str, name: str, extra: tuple[str, ...]) -> type | None:
    """A class allowed by a ``"pkg.mod.*"`` entry: defined in that module (or
    a submodule), which must already be imported; looked up, never imported."""
    if "." in name:
        return None
    for entry in extra:
        if not entry.endswith(".*"):
            continue
        prefix = entry[:-2]
        if module == prefix or module.startswith(prefix + "."):
            found = sys.modules.get(module)
            value = vars(found).get(name) if isinstance(found, types.ModuleType) else None
            if isinstance(value, type) and value.__module__ == module:
                return value
    return None


# --- the unpickler -------------------------------------------------------------------

_NOT_TARGETS = (
    type,
    types.ModuleType,
    types.FunctionType,
    types.BuiltinFunctionType,
    types.MethodType,
    functools.partial,
    zoneinfo.ZoneInfo,
    datetime.tzinfo,
)
_Base: Any = pickle._Unpickler  # the pure-Python one


class SafeUnpickler(_Base):
    """An unpickler that hands out only listed classes and functions."""

    dispatch = dict(_Base.dispatch)

    def __init__(self, file: Any, *, extra: tuple[str, ...] = (), **kwargs: Any) -> None:
        super().__init__(file, **kwargs)
        self.extra = extra
        self.table = _base_table()
        self.extra_table = _extra_table(extra) if extra else {}
        self.handed: dict[int, Any] = {}  # id -> what find_class handed out
        self.placeholders: list[type[StoredConnection]] = []

    def find_class(self, module: str, name: str) -> Any:
        # Protocols 0-2 may use Python 2 names (copy_reg, __builtin__).
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        dotted = f"{module}.{name}"
        found = self.table.get(dotted)
        if found is None and dotted in _LAZY_NAMES:
            found = _lazy_name(dotted)
        if found is None:
            found = self.extra_table.get(dotted)
        if found is None and self.extra:
            found = _wildcard_class(module, name, self.extra)
        if found is None:
            # Not listed: an inert stand-in, acceptable only as the message's
            # connection (checked once the whole pickle is read).
            found = type("StoredConnection", (StoredConnection,), {"dotted": dotted})
            self.placeholders.append(found)
        self.handed[id(found)] = found
        return found

    def persistent_load(self, pid: Any) -> Any:
        raise RefusedClass("a persistent id", "persistent ids are not allowed in stored messages")

    def _refuse_target(self, target: Any, opcode: str) -> None:
        name = getattr(target, "__qualname__", type(target).__name__)
        raise RefusedClass(
            str(name), f"{opcode} on {name} is not allowed in stored messages (not an instance "
            "created by the stored data)"
        )

    def load_build(self) -> None:
        stack = self.stack
        state = stack.pop()
        inst = stack[-1]
        kind = type(inst)
        if isinstance(inst, _NOT_TARGETS) or id(inst) in self.handed:
            self._refuse_target(inst, "BUILD")
        if isinstance(inst, StoredConnection):
            return
        slotstate = None
        if isinstance(state, tuple) and len(state) == 2:
            state, slotstate = state
        for part in (state, slotstate):
            if part is not None and not isinstance(part, dict):
                raise RefusedClass(kind.__qualname__, "BUILD with a state that is not a dict")
            if part and any(type(k) is not str or k.startswith("__") for k in part):
                raise RefusedClass(kind.__qualname__, "BUILD of a special attribute")
        setstate = getattr(kind, "__setstate__", None)
        if setstate is not None and setstate is not getattr(object, "__setstate__", None):
            inst.__setstate__(state if slotstate is None else (state, slotstate))
            return
        if state:
            inst.__dict__.update(state)
        if slotstate:
            for key, value in slotstate.items():
                setattr(inst, key, value)

    def _callable(self, func: Any, opcode: str) -> None:
        if id(func) not in self.handed and id(func) not in _SUBSTITUTE_IDS:
            self._refuse_target(func, opcode)

    def _target(self, target: Any, opcode: str) -> Any:
        if isinstance(target, _NOT_TARGETS) or id(target) in self.handed:
            self._refuse_target(target, opcode)
        return target

    def load_reduce(self) -> None:
        stack = self.stack
        args = stack.pop()
        func = stack[-1]
        self._callable(func, "REDUCE")
        if type(args) is not tuple:
            raise RefusedClass("REDUCE", "REDUCE with arguments that are not a tuple")
        stack[-1] = func(*args)

    def load_newobj(self) -> None:
        args = self.stack.pop()
        cls = self.stack.pop()
        self._callable(cls, "NEWOBJ")
        if not isinstance(cls, type) or type(args) is not tuple:
            raise RefusedClass("NEWOBJ", "NEWOBJ of something that is not a class")
        self.append(cls.__new__(cls, *args))

    def load_newobj_ex(self) -> None:
        kwargs = self.stack.pop()
        args = self.stack.pop()
        cls = self.stack.pop()
        self._callable(cls, "NEWOBJ_EX")
        if not isinstance(cls, type) or type(args) is not tuple or type(kwargs) is not dict:
            raise RefusedClass("NEWOBJ_EX", "NEWOBJ_EX of something that is not a class")
        self.append(cls.__new__(cls, *args, **kwargs))

    def load_obj(self) -> None:
        args = self.pop_mark()
        if not args:
            raise RefusedClass("OBJ", "OBJ without a class")
        cls = args.pop(0)
        self._callable(cls, "OBJ")
        self._instantiate(cls, args)

    def load_append(self) -> None:
        value = self.stack.pop()
        self._target(self.stack[-1], "APPEND").append(value)

    def load_appends(self) -> None:
        items = self.pop_mark()
        target = self._target(self.stack[-1], "APPENDS")
        extend = getattr(target, "extend", None)
        if extend is not None:
            extend(items)
            return
        for item in items:
            target.append(item)

    def load_setitem(self) -> None:
        stack = self.stack
        value = stack.pop()
        key = stack.pop()
        self._target(stack[-1], "SETITEM")[key] = value

    def load_setitems(self) -> None:
        items = self.pop_mark()
        target = self._target(self.stack[-1], "SETITEMS")
        for i in range(0, len(items), 2):
            target[items[i]] = items[i + 1]

    def load_additems(self) -> None:
        items = self.pop_mark()
        target = self._target(self.stack[-1], "ADDITEMS")
        if isinstance(target, set):
            target.update(items)
            return
        for item in items:
            target.add(item)

    def load_ext(self) -> None:
        raise RefusedClass(
            "a copyreg extension code",
            "copyreg extension codes are not allowed in stored messages",
        )

    dispatch[pickle.BUILD[0]] = load_build
    dispatch[pickle.REDUCE[0]] = load_reduce
    dispatch[pickle.NEWOBJ[0]] = load_newobj
    dispatch[pickle.NEWOBJ_EX[0]] = load_newobj_ex
    dispatch[pickle.OBJ[0]] = load_obj
    dispatch[pickle.APPEND[0]] = load_append
    dispatch[pickle.APPENDS[0]] = load_appends
    dispatch[pickle.SETITEM[0]] = load_setitem
    dispatch[pickle.SETITEMS[0]] = load_setitems
    dispatch[pickle.ADDITEMS[0]] = load_additems
    dispatch[pickle.EXT1[0]] = load_ext
    dispatch[pickle.EXT2[0]] = load_ext
    dispatch[pickle.EXT4[0]] = load_ext


def safe_loads(raw: bytes, extra: tuple[str, ...] | None = None) -> Any:
    """Unpickle ``raw`` through :class:`SafeUnpickler`; :class:`RefusedClass`
    when it holds anything unlisted outside the message's connection."""
    if extra is None:
        extra = tuple(conf.PICKLE_ALLOWLIST)
    unpickler = SafeUnpickler(io.BytesIO(raw), extra=extra)
    obj = unpickler.load()
    if unpickler.placeholders:
        _only_as_connection(obj)
    return obj


_CONNECTION_SLOTS = ("connection", "_connection")


def _only_as_connection(obj: Any) -> None:
    """Refuse a placeholder anywhere but as the top-level message's connection."""
    seen: set[int] = set()
    todo: list[Any] = [obj]
    top = True
    while todo:
        item = todo.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, StoredConnection) or (
            isinstance(item, type) and issubclass(item, StoredConnection)
        ):
            raise RefusedClass(item.dotted)
        if isinstance(item, dict):
            todo.extend(item.keys())
            todo.extend(item.values())
        elif isinstance(item, (list, tuple, set, frozenset)):
            todo.extend(item)
        elif not isinstance(item, (str, bytes, int, float, type(None))):
            state = getattr(item, "__dict__", None)
            if isinstance(state, dict):
                if top:
                    state = {k: v for k, v in state.items() if k not in _CONNECTION_SLOTS}
                todo.extend(state.values())
        top = False

