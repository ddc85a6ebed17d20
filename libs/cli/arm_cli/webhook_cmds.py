"""Notification webhooks from a terminal (a tenant admin's key): `arm webhooks create URL
[--event …] [--secret-file F]`, `list`, `show`, `rotate-secret`, `deliveries`, `delete`.
Format, signature and retries of what they receive: docs/webhooks.md."""

from __future__ import annotations

import secrets
from typing import Annotated, Any

import typer
from rich.markup import escape

from arm.governance.v1 import webhooks_pb2 as wpb
from arm_cli.main import Output, app, call
from arm_cli.output import Format, as_dict, console, emit_object, emit_rows, short_enum
from arm_cli.registry_cmds import pages
from arm_client.stubs import ArmClient

webhooks_app = typer.Typer(help="Notification webhooks: approval requests, escalations and decisions, "
                                "POSTed as signed JSON (docs/webhooks.md).", no_args_is_help=True)
app.add_typer(webhooks_app, name="webhooks")

# approval.requested → WEBHOOK_EVENT_TYPE_APPROVAL_REQUESTED, and the short forms `requested` etc.
_EVENTS: dict[str, int] = {}
for _name, _value in wpb.WebhookEventType.items():
    if _value:
        _short = short_enum(_name, "WEBHOOK_EVENT_TYPE_APPROVAL_").lower()
        _EVENTS[_short] = _EVENTS[f"approval.{_short}"] = _value
_CHOICES = ", ".join(k for k in _EVENTS if k.startswith("approval."))
_COLUMNS = ["id", "url", "events", "secret", "description", "created"]
_DELIVERY_COLUMNS = ["delivery", "event", "approval", "attempts", "status", "error", "delivered", "next_attempt"]


def _time(msg: Any, name: str) -> str:
    return msg.HasField(name) and getattr(msg, name).ToDatetime().isoformat(timespec="seconds") + "Z" or ""


def _event(value: int) -> str:
    return "approval." + short_enum(wpb.WebhookEventType.Name(value), "WEBHOOK_EVENT_TYPE_APPROVAL_").lower()


def _row(w: wpb.Webhook) -> dict[str, Any]:
    return {"id": w.webhook_id, "url": w.url, "events": " ".join(_event(e) for e in w.event_types),
            "secret": f"…{w.secret_hint}", "description": w.description, "created": _time(w, "create_time")}


def _read_secret(path: str | None) -> str:
    if not path:
        return ""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip()
    except OSError as exc:
        raise typer.BadParameter(f"cannot read {path!r}: {exc.strerror}", param_hint="--secret-file") from None


def _show_secret(secret: str, output: Format) -> None:
    if output is Format.table and secret:
        console().print(f"[bold]Signing secret[/bold] (shown once; keep it with the receiver): {escape(secret)}")


@webhooks_app.command("create")
def webhooks_create(ctx: typer.Context,
                    url: Annotated[str, typer.Argument(help="http:// or https:// URL the notifications are POSTed to")],
                    event: Annotated[list[str] | None, typer.Option(
                        "--event", "-e", help=f"Repeatable: {_CHOICES} (default: all)")] = None,
                    description: Annotated[str, typer.Option("--description", "-d")] = "",
                    secret_file: Annotated[str | None, typer.Option(
                        help="A file holding the signing secret to use (default: generate one)")] = None,
                    output: Output = Format.table) -> None:
    """A webhook for this tenant; prints its signing secret once."""
    types = []
    for name in event or []:
        if name.lower() not in _EVENTS:
            raise typer.BadParameter(f"{name!r}: one of {_CHOICES}", param_hint="--event")
        types.append(_EVENTS[name.lower()])
    types = list(dict.fromkeys(types)) or sorted(set(_EVENTS.values()))
    secret = _read_secret(secret_file)
    request = wpb.CreateWebhookRequest(request_id=f"cli-{secrets.token_hex(8)}", secret=secret, webhook=wpb.Webhook(
        url=url, event_types=types, description=description))  # type: ignore[arg-type]

    async def create(c: ArmClient) -> wpb.CreateWebhookResponse:
        return await c.webhooks.CreateWebhook(request)  # type: ignore[no-any-return]

    made = call(ctx, create)
    emit_object(_row(made.webhook), output, title="Webhook created", raw=as_dict(made))
    _show_secret(made.secret, output)


@webhooks_app.command("list")
def webhooks_list(ctx: typer.Context, output: Output = Format.table) -> None:
    async def fetch(c: ArmClient) -> list[Any]:
        return await pages(lambda t: c.webhooks.ListWebhooks(wpb.ListWebhooksRequest(page_size=500, page_token=t)),
                           "webhooks")

    items = call(ctx, fetch)
    emit_rows([_row(w) for w in items], output, _COLUMNS, raw=[as_dict(w) for w in items])


@webhooks_app.command("show")
def webhooks_show(ctx: typer.Context, webhook_id: Annotated[str, typer.Argument(metavar="WEBHOOK_ID")],
                  output: Output = Format.table) -> None:
    async def fetch(c: ArmClient) -> wpb.Webhook:
        return (await c.webhooks.GetWebhook(wpb.GetWebhookRequest(webhook_id=webhook_id))).webhook

    w = call(ctx, fetch)
    emit_object({**_row(w), "updated": _time(w, "update_time"), "etag": w.etag}, output,
                title=f"Webhook {w.webhook_id}", raw=as_dict(w))


@webhooks_app.command("rotate-secret")
def webhooks_rotate(ctx: typer.Context, webhook_id: Annotated[str, typer.Argument(metavar="WEBHOOK_ID")],
                    secret_file: Annotated[str | None, typer.Option(
                        help="A file holding the new secret (default: generate one)")] = None,
                    output: Output = Format.table) -> None:
    """A new signing secret, printed once; deliveries are signed with it from now on."""
    request = wpb.RotateWebhookSecretRequest(request_id=f"cli-{secrets.token_hex(8)}", webhook_id=webhook_id,
                                             secret=_read_secret(secret_file))

    async def rotate(c: ArmClient) -> wpb.RotateWebhookSecretResponse:
        return await c.webhooks.RotateWebhookSecret(request)  # type: ignore[no-any-return]

    done = call(ctx, rotate)
    emit_object(_row(done.webhook), output, title="Secret rotated", raw=as_dict(done))
    _show_secret(done.secret, output)


@webhooks_app.command("delete")
def webhooks_delete(ctx: typer.Context, webhook_id: Annotated[str, typer.Argument(metavar="WEBHOOK_ID")],
                    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask")] = False,
                    output: Output = Format.table) -> None:
    """Deletes the webhook and drops its undelivered notifications."""
    if not yes and not typer.confirm(f"Delete webhook {webhook_id} and its undelivered notifications?"):
        raise typer.Exit(1)
    request = wpb.DeleteWebhookRequest(request_id=f"cli-{secrets.token_hex(8)}", webhook_id=webhook_id)

    async def delete(c: ArmClient) -> wpb.DeleteWebhookResponse:
        return await c.webhooks.DeleteWebhook(request)  # type: ignore[no-any-return]

    done = call(ctx, delete)
    emit_object({"deleted": webhook_id, "dropped_deliveries": done.dropped_deliveries}, output,
                raw={"webhook_id": webhook_id, **as_dict(done)})


@webhooks_app.command("deliveries")
def webhooks_deliveries(ctx: typer.Context, webhook_id: Annotated[str, typer.Argument(metavar="WEBHOOK_ID")],
                        pending: Annotated[bool, typer.Option(help="Only those still retrying")] = False,
                        limit: Annotated[int, typer.Option(min=1, max=500)] = 50,
                        output: Output = Format.table) -> None:
    """The webhook's most recent deliveries, newest first: attempts, last status, error."""
    async def fetch(c: ArmClient) -> list[Any]:
        return list((await c.webhooks.ListWebhookDeliveries(wpb.ListWebhookDeliveriesRequest(
            webhook_id=webhook_id, page_size=limit, pending_only=pending))).deliveries)

    items = call(ctx, fetch)
    rows = [{"delivery": d.delivery_id, "event": _event(d.event_type), "approval": d.approval_id,
             "attempts": d.attempts, "status": d.last_status or "", "error": d.last_error,
             "delivered": _time(d, "deliver_time"), "next_attempt": _time(d, "next_attempt_time")} for d in items]
    emit_rows(rows, output, _DELIVERY_COLUMNS, raw=[as_dict(d) for d in items])
