"""The operator's CA and the certificates of the operator<->agent mutual TLS.

One CA per installation, made on the operator's first start (``cryptography``, ECDSA P-256) and
kept in the Secret :data:`CA_SECRET` of the operator's namespace: its key never leaves that
Secret and the operator's memory. It issues

* the operator's **client certificate** (URI SAN
  :data:`~meshaccel.contract.tls.OPERATOR_IDENTITY`, clientAuth only), valid a day, renewed after
  half of it and only ever in memory (:meth:`Credentials.client_context`);
* per MeshAcceleration, the agents' **server certificate** (DNS SAN
  :data:`~meshaccel.contract.tls.AGENT_SERVER_NAME`, serverAuth only), valid 90 days and renewed
  after 60, which the agents' Secret carries with the **bundle** of CAs the agents accept client
  certificates from (:meth:`Credentials.agent_tls`).

Rotation is a sequence of writes to the CA Secret, each a compare-and-swap on its
resourceVersion (two replicas never fork the CA), taken by :func:`next_step`:

1. ``ca`` alone: agents trust [ca]; everything is issued by it.
2. ``ca`` is 2/3 through its life (a year), or the Secret carries :data:`ROTATE_ANNOTATION`: a
   new CA joins as ``next``. Agents trust [ca, next]; the operator still signs with ca.
3. Every agent the operator reaches reports the fingerprint of [ca, next] (``GET /v1/health``):
   next becomes ca and the old one ``retired``. Agents trust [new]; their server certificates
   and the operator's client certificate are issued by the new CA; the operator still accepts
   agents' server certificates issued by the retired one.
4. Every reachable agent reports the fingerprint of [new]: the retired CA is dropped.

Steps 3 and 4 go ahead without the confirmations once the CA in force has less than
:data:`SWITCH_DEADLINE` left: an agent that was unreachable meanwhile gets its Secret from
kubelet when it is back. docs/security.md tells the story and why one server key per
MeshAcceleration is enough.

The CA certificates alone, every one an agent's server certificate may chain to (active, next,
retired: :attr:`CAState.trusted_pem`), are also in the ConfigMap :data:`CA_CONFIGMAP`, which the
leader keeps equal to the Secret: Prometheus verifies the agents with it (the chart's
PodMonitor) without being given the Secret, which holds the keys.
"""

from __future__ import annotations

import base64
import datetime as dt
import logging
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Final, Protocol

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from kubernetes.aio import client as k8s

from meshaccel.contract.tls import (
    AGENT_SERVER_NAME,
    OPERATOR_IDENTITY,
    bundle_fingerprint,
    client_context,
)
from meshaccel.operator.kube import Kube, KubeError

log = logging.getLogger("meshaccel.operator.credentials")

CA_SECRET: Final = "meshaccel-operator-ca"
# The CA certificates without their keys, for those who verify agents (Prometheus), as
# kube-root-ca.crt holds the cluster's; the chart's PodMonitor names it.
CA_CONFIGMAP: Final = "meshaccel-agents-ca"
CA_CONFIGMAP_KEY: Final = "ca.crt"
ROTATE_ANNOTATION: Final = "meshaccel.io/rotate-ca"
CA_VALIDITY: Final = dt.timedelta(days=365)
CA_ROTATE_AFTER: Final = CA_VALIDITY * 2 / 3
SWITCH_DEADLINE: Final = dt.timedelta(days=30)
SERVER_VALIDITY: Final = dt.timedelta(days=90)
SERVER_RENEW_AFTER: Final = dt.timedelta(days=60)
CLIENT_VALIDITY: Final = dt.timedelta(hours=24)
CLIENT_RENEW_AFTER: Final = dt.timedelta(hours=12)
CLOCK_SKEW: Final = dt.timedelta(minutes=5)  # notBefore this far back: nodes' clocks differ
CHECK_INTERVAL: Final = 60.0  # seconds between reads of the CA Secret (tend)

# The CA Secret's keys.
CA_CERT, CA_KEY = "ca.crt", "ca.key"
NEXT_CERT, NEXT_KEY = "next.crt", "next.key"
RETIRED_CERT = "retired.crt"
# The agents' Secret's keys (and file names in their volume).
TLS_CERT, TLS_KEY, TLS_CA = "tls.crt", "tls.key", "ca.crt"

Clock = Callable[[], dt.datetime]


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


# -- certificates ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Authority:
    """A CA: its certificate and key (the certificate says which CA: equal ones are one)."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey = field(compare=False, repr=False)

    @property
    def pem(self) -> str:
        return _cert_pem(self.cert)

    @property
    def key_pem(self) -> str:
        return _key_pem(self.key)

    @property
    def not_before(self) -> dt.datetime:
        return self.cert.not_valid_before_utc

    @property
    def not_after(self) -> dt.datetime:
        return self.cert.not_valid_after_utc

    def issued(self, cert: x509.Certificate) -> bool:
        """``cert`` carries this CA's signature."""
        try:
            cert.verify_directly_issued_by(self.cert)
        except (ValueError, TypeError, InvalidSignature):
            return False
        return True


@dataclass(frozen=True)
class Issued:
    """A leaf certificate and its key, PEM."""

    cert_pem: str
    key_pem: str
    cert: x509.Certificate

    @property
    def not_before(self) -> dt.datetime:
        return self.cert.not_valid_before_utc

    @property
    def not_after(self) -> dt.datetime:
        return self.cert.not_valid_after_utc


def _cert_pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def _key_pem(key: ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def new_authority(now: dt.datetime, *, validity: dt.timedelta = CA_VALIDITY) -> Authority:
    """A new CA, valid from ``now`` (less the clock skew) for ``validity``. Its name carries
    the date and a random part, so that the old and the new CA of a rotation differ by name."""
    key = _new_key()
    serial = x509.random_serial_number()
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "meshaccel"),
            x509.NameAttribute(
                NameOID.COMMON_NAME, f"meshaccel operator CA {now:%Y-%m-%d} {serial:x}"[:64]
            ),
        ]
    )
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + validity)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    return Authority(cert, key)


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def issue(
    ca: Authority,
    *,
    common_name: str,
    san: x509.GeneralName,
    usage: x509.ObjectIdentifier,
    now: dt.datetime,
    validity: dt.timedelta,
) -> Issued:
    """A leaf certificate for one purpose (``usage``: serverAuth or clientAuth), never past
    its CA's own end."""
    key = _new_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(min(now + validity, ca.not_after))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectAlternativeName([san]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
            critical=False,
        )
        .sign(ca.key, hashes.SHA256())
    )
    return Issued(_cert_pem(cert), _key_pem(key), cert)


def issue_server(
    ca: Authority, now: dt.datetime, *, validity: dt.timedelta = SERVER_VALIDITY
) -> Issued:
    """An agent's server certificate (the same for every node of a MeshAcceleration)."""
    return issue(
        ca,
        common_name="meshaccel-agent",
        san=x509.DNSName(AGENT_SERVER_NAME),
        usage=ExtendedKeyUsageOID.SERVER_AUTH,
        now=now,
        validity=validity,
    )


def issue_client(
    ca: Authority,
    now: dt.datetime,
    *,
    identity: str = OPERATOR_IDENTITY,
    validity: dt.timedelta = CLIENT_VALIDITY,
) -> Issued:
    """The operator's client certificate (tests give another ``identity``)."""
    return issue(
        ca,
        common_name="meshaccel-operator",
        san=x509.UniformResourceIdentifier(identity),
        usage=ExtendedKeyUsageOID.CLIENT_AUTH,
        now=now,
        validity=validity,
    )


# -- the CA Secret --------------------------------------------------------------------------------


class CredentialsError(Exception):
    """The CA Secret cannot be read or written (``str()`` says why)."""


class SecretConflict(CredentialsError):
    """The Secret (or ConfigMap) exists already (create), or moved on since it was read
    (patch)."""


@dataclass(frozen=True)
class CAState:
    """The CA Secret, read: the CA in force, the one joining or leaving, if any."""

    active: Authority
    next: Authority | None = None
    retired: x509.Certificate | None = None
    version: str | None = None  # the Secret's resourceVersion
    rotate_requested: bool = False  # the Secret carries ROTATE_ANNOTATION

    @property
    def bundle_pem(self) -> str:
        """What agents accept client certificates from: the CA in force and the joining one."""
        return "".join(a.pem for a in (self.active, self.next) if a is not None)

    @property
    def trusted_pem(self) -> str:
        """What the operator accepts agents' server certificates from: also the retired CA."""
        retired = _cert_pem(self.retired) if self.retired is not None else ""
        return self.bundle_pem + retired

    @property
    def bundle_fingerprint(self) -> str:
        return bundle_fingerprint(self.bundle_pem)

    @property
    def phase(self) -> str:
        if self.next is not None:
            return "introducing"
        return "retiring" if self.retired is not None else "stable"

    def data(self) -> dict[str, str | None]:
        """The Secret's ``data`` (base64), None for a key to remove (a merge patch)."""
        plain = {
            CA_CERT: self.active.pem,
            CA_KEY: self.active.key_pem,
            NEXT_CERT: self.next.pem if self.next else None,
            NEXT_KEY: self.next.key_pem if self.next else None,
            RETIRED_CERT: _cert_pem(self.retired) if self.retired is not None else None,
        }
        return {
            key: None if value is None else base64.b64encode(value.encode()).decode()
            for key, value in plain.items()
        }

    @classmethod
    def from_secret(cls, secret: Mapping[str, Any]) -> CAState:
        meta = secret.get("metadata") or {}
        data = {
            key: base64.b64decode(value).decode()
            for key, value in (secret.get("data") or {}).items()
        }
        try:
            active = _authority(data[CA_CERT], data[CA_KEY])
            joining = _authority(data[NEXT_CERT], data[NEXT_KEY]) if NEXT_CERT in data else None
            retired = (
                x509.load_pem_x509_certificate(data[RETIRED_CERT].encode())
                if RETIRED_CERT in data
                else None
            )
        except (KeyError, ValueError, TypeError) as err:
            raise CredentialsError(
                f"the Secret {CA_SECRET} does not hold a usable CA ({type(err).__name__}: "
                f"{err}): delete it to have a new CA made (agents then refuse the operator "
                "until their Secret is updated, a minute or two)"
            ) from None
        return cls(
            active=active,
            next=joining,
            retired=retired,
            version=meta.get("resourceVersion"),
            rotate_requested=ROTATE_ANNOTATION in (meta.get("annotations") or {}),
        )


def _authority(cert_pem: str, key_pem: str) -> Authority:
    cert = x509.load_pem_x509_certificate(cert_pem.encode())
    key = serialization.load_pem_private_key(key_pem.encode(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise TypeError(f"the CA key is a {type(key).__name__}, not an EC key")
    if key.public_key() != cert.public_key():
        raise ValueError("the CA key does not belong to its certificate")
    return Authority(cert, key)


def next_step(
    state: CAState, now: dt.datetime, reports: Mapping[str, str | None]
) -> tuple[CAState, str] | None:
    """The rotation's next write, and why; None while there is nothing to do.

    ``reports``: the agents the operator reaches, each with the fingerprint of the CA bundle it
    last reported (None: not heard since its endpoint changed). Unreachable agents are not in
    it: they do not hold a rotation up.
    """
    if state.active.not_after <= now:
        return CAState(new_authority(now)), "the CA expired: a new one, in force at once"
    if state.next is not None:
        waiting = _waiting(reports, state.bundle_fingerprint)
        if waiting and state.active.not_after - now > SWITCH_DEADLINE:
            return None
        why = (
            "every agent reached trusts the new CA"
            if not waiting
            else (
                f"{len(waiting)} agents did not confirm, but the CA in force ends "
                f"{state.active.not_after:%Y-%m-%d}"
            )
        )
        return CAState(state.next, retired=state.active.cert), f"the new CA in force: {why}"
    if state.retired is not None:
        waiting = _waiting(reports, state.bundle_fingerprint)
        if waiting and state.retired.not_valid_after_utc > now:
            return None
        return CAState(state.active), "the retired CA dropped: every agent reached uses the new one"
    if state.rotate_requested or now >= state.active.not_before + CA_ROTATE_AFTER:
        why = (
            f"annotation {ROTATE_ANNOTATION}"
            if state.rotate_requested
            else (f"the CA in force ends {state.active.not_after:%Y-%m-%d}")
        )
        return CAState(state.active, next=new_authority(now)), f"rotation: a new CA joins ({why})"
    return None


def _waiting(reports: Mapping[str, str | None], fingerprint: str) -> list[str]:
    return sorted(agent for agent, reported in reports.items() if reported != fingerprint)


# -- where the CA Secret and its ConfigMap live ---------------------------------------------------


class ObjectStore(Protocol):
    """Objects of one kind in the operator's namespace, by name (tests keep them in memory)."""

    async def read(self, name: str) -> dict[str, Any] | None: ...

    async def create(self, obj: Mapping[str, Any]) -> dict[str, Any]: ...

    async def patch(self, name: str, version: str, patch: Mapping[str, Any]) -> dict[str, Any]:
        """A merge patch that carries ``version`` as its resourceVersion (a compare-and-swap:
        :class:`SecretConflict` if the object moved on)."""
        ...


SecretStore = ObjectStore  # the CA Secret's
ConfigMapStore = ObjectStore  # the CA certificates' ConfigMap's


class KubeObjects:
    """:class:`ObjectStore` through the API (the official client's ApiClient, as :mod:`.kube`
    uses it), for the ``kind`` of the subclass."""

    kind: ClassVar[str]

    def __init__(self, api: k8s.ApiClient, namespace: str) -> None:
        self._kube = Kube(api)
        self.namespace = namespace

    async def read(self, name: str) -> dict[str, Any] | None:
        status, obj = await self._call("GET", name)
        return None if status == 404 else obj

    async def create(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        return (await self._call("POST", None, obj))[1]

    async def patch(self, name: str, version: str, patch: Mapping[str, Any]) -> dict[str, Any]:
        body = {**patch, "metadata": {**patch.get("metadata", {}), "resourceVersion": version}}
        return (await self._call("PATCH", name, body, "application/merge-patch+json"))[1]

    async def _call(
        self,
        method: str,
        name: str | None,
        body: Mapping[str, Any] | None = None,
        content_type: str = "application/json",
    ) -> tuple[int, dict[str, Any]]:
        try:
            return await self._kube.request(
                method, self.kind, self.namespace, name, body, content_type
            )
        except KubeError as err:
            if err.status == 409:
                raise SecretConflict(str(err)) from err
            raise CredentialsError(str(err)) from err


class KubeSecrets(KubeObjects):
    kind: ClassVar[str] = "Secret"


class KubeConfigMaps(KubeObjects):
    kind: ClassVar[str] = "ConfigMap"


def _labels(component: str) -> dict[str, str]:
    """The labels of the operator's own objects here (rendering.py names the same keys, for
    the agents' objects; it imports this module, so they are spelt out)."""
    return {
        "app.kubernetes.io/name": "meshaccel",
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/managed-by": "meshaccel-operator",
    }


# -- what the runtime uses ------------------------------------------------------------------------


@dataclass(frozen=True)
class AgentTLS:
    """What the agents' Secret holds: their server certificate and key, and the CA bundle
    they accept the operator's client certificates from (PEM)."""

    cert_pem: str
    key_pem: str
    bundle_pem: str


@dataclass
class _ClientCert:
    issued: Issued
    issuer: x509.Certificate
    trusted: str
    context: ssl.SSLContext


@dataclass
class Credentials:
    """The operator's side: the CA state, its client context, the agents' server certificates.

    :meth:`load` (idempotent) reads the CA Secret or makes it; :meth:`tend`, called often and
    reading the Secret at most every ``check_interval`` seconds, follows its changes and takes
    the rotation's next step. Both must run before anything is issued. A writer's
    :meth:`tend` also keeps the ConfigMap :data:`CA_CONFIGMAP` (in ``configmaps``) equal to
    the CA certificates in force.
    """

    store: SecretStore
    namespace: str
    configmaps: ConfigMapStore
    clock: Clock = utc_now
    monotonic: Callable[[], float] = time.monotonic
    check_interval: float = CHECK_INTERVAL
    state: CAState | None = None
    _servers: dict[str, Issued] = field(default_factory=dict)
    _client: _ClientCert | None = None
    _checked: float | None = None
    _published: bool = False  # the ConfigMap was checked since this replica began writing

    async def load(self) -> CAState:
        """The CA state, read once (made on the very first start)."""
        if self.state is None:
            self.state = await self._read_or_make()
            self._checked = self.monotonic()
        return self.state

    async def tend(self, reports: Callable[[], Mapping[str, str | None]], *, writing: bool) -> None:
        """Every ``check_interval``: read the CA Secret again (another replica, a person, may
        have changed it) and, if this replica writes (``writing``: it leads), take the
        rotation's next step, then bring the ConfigMap :data:`CA_CONFIGMAP` in line (at once on
        its first call as the writer). Failures are logged; the next check tries again."""
        await self.load()
        if not writing:
            self._published = False  # should it lead again, it checks the ConfigMap at once
        now = self.monotonic()
        if self._checked is not None and now - self._checked < self.check_interval:
            if writing and not self._published:
                await self._publish()
            return
        self._checked = now
        try:
            state = await self._read_or_make()
            self._adopt(state)
            step = next_step(state, self.clock(), reports()) if writing else None
            if step is not None:
                await self._write(state, *step)
        except CredentialsError as err:
            log.warning("CA Secret: %s", err, extra={"event": "ca_failed", "secret": CA_SECRET})
            return  # the ConfigMap waits for a good read of the Secret
        if writing:
            await self._publish()

    def client_context(self) -> ssl.SSLContext:
        """The context every request to an agent uses: the operator's client certificate,
        renewed after :data:`CLIENT_RENEW_AFTER` or when the CA in force changes, and the CAs
        agents' server certificates are accepted from."""
        state = self._loaded()
        now = self.clock()
        client = self._client
        if (
            client is None
            or client.issuer != state.active.cert
            or now >= client.issued.not_before + CLOCK_SKEW + CLIENT_RENEW_AFTER
            or now >= client.issued.not_after
        ):
            issued = issue_client(state.active, now)
            log.info(
                "client certificate issued",
                extra={
                    "event": "client_certificate",
                    "not_after": issued.not_after.isoformat(),
                    "ca": state.active.cert.subject.rfc4514_string(),
                },
            )
        elif client.trusted != state.trusted_pem:
            issued = client.issued  # the same certificate, other CAs to accept agents from
        else:
            return client.context
        context = client_context(issued.cert_pem, issued.key_pem, state.trusted_pem)
        client = self._client = _ClientCert(issued, state.active.cert, state.trusted_pem, context)
        return client.context

    async def agent_tls(self, acceleration: str, secret_name: str) -> AgentTLS:
        """The agents' Secret's content: the server certificate in that Secret while it is
        good (issued by the CA in force, not due for renewal), else a new one; the bundle."""
        state = self._loaded()
        now = self.clock()
        issued = self._servers.get(acceleration)
        if issued is None:
            issued = _stored_server(await self.store.read(secret_name))
        if issued is None or not _good(issued, state.active, now):
            issued = issue_server(state.active, now)
            log.info(
                "agents' server certificate issued",
                extra={
                    "event": "server_certificate",
                    "acceleration": acceleration,
                    "not_after": issued.not_after.isoformat(),
                },
            )
        self._servers[acceleration] = issued
        return AgentTLS(issued.cert_pem, issued.key_pem, state.bundle_pem)

    def forget(self, acceleration: str) -> None:
        self._servers.pop(acceleration, None)

    # -- internals ---------------------------------------------------------------------------

    def _loaded(self) -> CAState:
        if self.state is None:
            raise RuntimeError("Credentials.load() first")
        return self.state

    async def _read_or_make(self) -> CAState:
        secret = await self.store.read(CA_SECRET)
        if secret is not None:
            return CAState.from_secret(secret)
        state = CAState(new_authority(self.clock()))
        try:
            made = await self.store.create(
                {
                    "apiVersion": "v1",
                    "kind": "Secret",
                    "type": "Opaque",
                    "metadata": {
                        "name": CA_SECRET,
                        "namespace": self.namespace,
                        "labels": _labels("operator-ca"),
                    },
                    "data": {k: v for k, v in state.data().items() if v is not None},
                }
            )
        except SecretConflict:  # another replica made it first: theirs
            found = await self.store.read(CA_SECRET)
            if found is None:
                raise CredentialsError(f"the Secret {CA_SECRET} came and went") from None
            return CAState.from_secret(found)
        log.info(
            "CA made",
            extra={
                "event": "ca_made",
                "secret": CA_SECRET,
                "not_after": state.active.not_after.isoformat(),
            },
        )
        return replace(state, version=(made.get("metadata") or {}).get("resourceVersion"))

    async def _publish(self) -> None:
        """Make the ConfigMap :data:`CA_CONFIGMAP`, or set it back, to hold the trusted CAs'
        certificates and nothing else; read first, so that a check of a right one writes
        nothing. A failure is logged: the next check tries again."""
        self._published = True
        state = self._loaded()
        wanted = {CA_CONFIGMAP_KEY: state.trusted_pem}
        try:
            found = await self.configmaps.read(CA_CONFIGMAP)
            if found is None:
                await self.configmaps.create(self._configmap(wanted))
            elif (data := found.get("data") or {}) != wanted:
                version = (found.get("metadata") or {}).get("resourceVersion")
                if version is None:
                    raise CredentialsError(f"the ConfigMap {CA_CONFIGMAP} has no resourceVersion")
                extra = {key: None for key in data if key not in wanted}  # a merge patch drops
                await self.configmaps.patch(CA_CONFIGMAP, version, {"data": {**extra, **wanted}})
            else:
                return
        except CredentialsError as err:
            log.warning(
                "CA ConfigMap: %s", err, extra={"event": "ca_failed", "configmap": CA_CONFIGMAP}
            )
            return
        log.info(
            "CA ConfigMap written",
            extra={"event": "ca_published", "phase": state.phase, "configmap": CA_CONFIGMAP},
        )

    def _configmap(self, data: Mapping[str, str]) -> dict[str, Any]:
        return {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {
                "name": CA_CONFIGMAP,
                "namespace": self.namespace,
                "labels": _labels("agents-ca"),
            },
            "data": dict(data),
        }

    def _adopt(self, state: CAState) -> None:
        previous = self.state
        self.state = state
        if previous is not None and previous.data() != state.data():
            log.info(
                "CA Secret changed",
                extra={"event": "ca_changed", "phase": state.phase, "secret": CA_SECRET},
            )

    async def _write(self, state: CAState, wanted: CAState, why: str) -> None:
        if state.version is None:
            raise CredentialsError(f"the Secret {CA_SECRET} was read without a resourceVersion")
        patch: dict[str, Any] = {"data": wanted.data()}
        if state.rotate_requested:
            patch["metadata"] = {"annotations": {ROTATE_ANNOTATION: None}}
        try:
            stored = await self.store.patch(CA_SECRET, state.version, patch)
        except SecretConflict:
            log.info(
                "CA Secret moved on: the rotation step waits for the next check",
                extra={"event": "ca_conflict", "secret": CA_SECRET},
            )
            return
        self._adopt(CAState.from_secret(stored))
        log.info(
            why,
            extra={
                "event": "ca_rotation",
                "phase": wanted.phase,
                "trust_bundle": wanted.bundle_fingerprint,
                "secret": CA_SECRET,
            },
        )


def _stored_server(secret: Mapping[str, Any] | None) -> Issued | None:
    """The server certificate an agents' Secret holds, if it holds a readable one."""
    data = (secret or {}).get("data") or {}
    if TLS_CERT not in data or TLS_KEY not in data:
        return None
    try:
        cert_pem = base64.b64decode(data[TLS_CERT]).decode()
        key_pem = base64.b64decode(data[TLS_KEY]).decode()
        cert = x509.load_pem_x509_certificate(cert_pem.encode())
        key = serialization.load_pem_private_key(key_pem.encode(), password=None)
    except (ValueError, TypeError):
        return None
    if key.public_key() != cert.public_key():
        return None
    return Issued(cert_pem, key_pem, cert)


def _good(issued: Issued, ca: Authority, now: dt.datetime) -> bool:
    """Issued by the CA in force for the agents' name, and not due for renewal."""
    try:
        names = issued.cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return False
    return (
        ca.issued(issued.cert)
        and AGENT_SERVER_NAME in names.value.get_values_for_type(x509.DNSName)
        and now < issued.not_before + CLOCK_SKEW + SERVER_RENEW_AFTER
        and now < issued.not_after
    )
