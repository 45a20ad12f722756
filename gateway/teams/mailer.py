"""Outgoing mail: every message is recorded in the ``outbox`` table, then sent over SMTP with
aiosmtplib (``smtp:`` in config), or, with no SMTP host configured, written to the server log.

Two steps so that no transaction waits on a mail server: :meth:`Mailer.record` inserts the
outbox row inside the caller's transaction (status ``pending``); after the commit,
:meth:`Mailer.deliver` sends it within ``smtp.timeout_s`` and records the outcome (``sent``,
``failed``, ``logged``). Delivery never raises: a refused or slow server is logged and the
request that caused the mail still succeeds. Once a mail has gone out, the one-time secrets it
carried (invitation tokens) are redacted from the stored body; a ``failed`` or ``logged`` mail
keeps its body so that the link can still be followed or passed on by hand.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import formatdate, make_msgid, parseaddr

import aiosmtplib
import asyncpg

from gateway.config import SmtpConfig

log = logging.getLogger("modelbridge.mailer")

REDACTED = "[redacted]"


@dataclass(frozen=True, slots=True)
class Mail:
    to: str
    subject: str
    body: str
    kind: str = "mail"
    ref_id: str = ""
    secrets: tuple[str, ...] = ()  # redacted from the outbox once sent


@dataclass(frozen=True, slots=True)
class Queued:
    outbox_id: int
    mail: Mail


class Mailer:
    def __init__(
        self, smtp: SmtpConfig, db: asyncpg.Pool, now: Callable[[], float] = time.time
    ) -> None:
        self.smtp = smtp
        self.db = db
        self.now = now  # the app's clock

    async def record(self, conn: asyncpg.Connection, mail: Mail) -> Queued:
        """Insert the outbox row (call inside the transaction that made the mail necessary)."""
        outbox_id = await conn.fetchval(
            "INSERT INTO outbox (kind, ref_id, to_addr, subject, body) VALUES ($1, $2, $3, $4, $5)"
            " RETURNING id",
            mail.kind,
            mail.ref_id,
            mail.to,
            mail.subject,
            mail.body,
        )
        return Queued(int(outbox_id), mail)

    async def deliver(self, queued: Queued) -> str:
        """Send (or log) a recorded mail; returns the outbox status. Never raises."""
        mail = queued.mail
        if not self.smtp.host:
            log.warning(
                "no SMTP host configured; mail to %s kept in the outbox (id %d):"
                "\nSubject: %s\n\n%s",
                mail.to,
                queued.outbox_id,
                mail.subject,
                mail.body,
            )
            return await self._finish(queued, "logged", None)
        try:
            async with asyncio.timeout(self.smtp.timeout_s):
                await self._send(mail)
        except asyncio.CancelledError:
            raise
        except TimeoutError:
            return await self._failed(queued, f"SMTP timed out after {self.smtp.timeout_s}s")
        except Exception as exc:  # aiosmtplib errors, OSError: log, never fail the request
            return await self._failed(queued, f"{type(exc).__name__}: {exc}")
        log.info("mail %d (%s) sent to %s", queued.outbox_id, mail.kind, mail.to)
        return await self._finish(queued, "sent", None)

    def message(self, mail: Mail) -> EmailMessage:
        msg = EmailMessage()
        msg["From"] = self.smtp.from_addr
        msg["To"] = mail.to
        msg["Subject"] = mail.subject
        msg["Date"] = formatdate(localtime=False)
        msg["Message-ID"] = make_msgid(domain=self._sender().rpartition("@")[2] or None)
        msg.set_content(mail.body)
        return msg

    def _sender(self) -> str:
        return parseaddr(self.smtp.from_addr)[1] or self.smtp.from_addr

    async def _send(self, mail: Mail) -> None:
        smtp = self.smtp
        username = os.environ.get(smtp.username_env) if smtp.username_env else None
        password = os.environ.get(smtp.password_env) if smtp.password_env else None
        await aiosmtplib.send(
            self.message(mail),
            sender=self._sender(),
            recipients=[mail.to],  # never taken from headers
            hostname=smtp.host,
            port=smtp.port,
            username=username or None,
            password=password or None,
            start_tls=smtp.starttls,
            timeout=smtp.timeout_s,
        )

    async def _failed(self, queued: Queued, error: str) -> str:
        log.error(
            "mail %d (%s) to %s could not be sent: %s",
            queued.outbox_id,
            queued.mail.kind,
            queued.mail.to,
            error,
        )
        return await self._finish(queued, "failed", error[:1000])

    async def _finish(self, queued: Queued, status: str, error: str | None) -> str:
        body = queued.mail.body
        if status == "sent":
            for secret in queued.mail.secrets:
                body = body.replace(secret, REDACTED)
        try:
            await self.db.execute(
                "UPDATE outbox SET status = $2, error = $3, body = $4,"
                " sent_at = CASE WHEN $2 = 'sent' THEN $5::timestamptz END WHERE id = $1",
                queued.outbox_id,
                status,
                error,
                body,
                datetime.fromtimestamp(self.now(), UTC),
            )
        except (asyncpg.PostgresError, OSError) as exc:
            log.error("outbox %d: could not record status %s: %s", queued.outbox_id, status, exc)
        return status
