// Shared building blocks: fields and forms with API error handling, cards, tables, dialogs,
// toasts, copy buttons, dates.

import { ApiError } from './api.js';
import { h, uid } from './dom.js';
import { exact, usd } from './money.js';

/** An amount as text, its every digit on hover (a small amount is never hidden as "<$0.0001"). */
export function money(value, opts = {}) {
  return h('span', { class: 'money', title: exact(value) || undefined }, usd(value, opts));
}

// --- messages ------------------------------------------------------------------------------------
/** The API's error.message as a sentence: "wrong email or password" -> "Wrong email or password." */
export function sentence(text) {
  const trimmed = String(text).trim();
  const capital = trimmed.charAt(0).toUpperCase() + trimmed.slice(1);
  return /[.!?)]$/.test(capital) ? capital : `${capital}.`;
}

export function errorMessage(err) {
  const own = err && !(err instanceof Error) && err.message; // the browser's own validation
  if (err instanceof ApiError || err instanceof RangeError || own) return sentence(err.message);
  return sentence(`Something went wrong: ${err && err.message ? err.message : err}`);
}

export function toast(message, kind = 'ok') {
  const box = document.getElementById('toasts');
  const item = h('div', { class: ['toast', kind === 'error' && 'error'] }, message);
  box.append(item);
  setTimeout(() => item.remove(), kind === 'error' ? 8000 : 4000);
}

// --- fields --------------------------------------------------------------------------------------
/**
 * A labelled control. `name` is the API field name, so an error with that `param` lands here.
 * opts: label, type, value, hint, required, autocomplete, placeholder, prefix, options
 * ([value, label] pairs for a select), readOnly, min, max, step, inputmode.
 */
export function field(name, label, opts = {}) {
  const id = opts.id || uid(name);
  const hintId = `${id}-hint`;
  const errId = `${id}-error`;
  const described = [opts.hint && hintId, errId].filter(Boolean).join(' ');
  let control;
  if (opts.options) {
    control = h('select', { id, name, 'aria-describedby': described, required: opts.required,
      disabled: opts.disabled },
    opts.options.map(([value, text]) => h('option', { value }, text)));
    if (opts.value !== undefined && opts.value !== null) control.value = opts.value;
  } else {
    control = h('input', {
      id, name, type: opts.type || 'text', value: opts.value ?? '', required: opts.required,
      autocomplete: opts.autocomplete || 'off', placeholder: opts.placeholder,
      readOnly: opts.readOnly, min: opts.min, max: opts.max, step: opts.step,
      inputmode: opts.inputmode, minlength: opts.minlength, 'aria-describedby': described,
      spellcheck: opts.type === 'email' || opts.type === 'password' ? 'false' : undefined,
    });
  }
  const input = opts.prefix ? h('div', { class: 'input-prefix' }, h('span', { 'aria-hidden': 'true' }, opts.prefix), control) : control;
  return h('div', { class: 'field' },
    h('label', { for: id }, label),
    input,
    opts.hint ? h('p', { class: 'hint', id: hintId }, opts.hint) : null,
    h('p', { class: 'field-error', id: errId }));
}

export function moneyField(name, label, value, opts = {}) {
  return field(name, label, { ...opts, value, prefix: '$', inputmode: 'decimal', placeholder: opts.placeholder ?? 'No limit' });
}

export function radios(name, legend, options, value, opts = {}) {
  return h('fieldset', { class: 'field' },
    h('legend', {}, legend),
    h('div', { class: 'choices stacked' }, options.map(([v, text]) => h('label', { class: 'choice' },
      h('input', { type: 'radio', name, value: v, checked: v === value, disabled: opts.disabled }), text))),
    opts.hint ? h('p', { class: 'hint' }, opts.hint) : null,
    h('p', { class: 'field-error' }));
}

function clearErrors(form) {
  for (const el of form.querySelectorAll('[aria-invalid]')) el.removeAttribute('aria-invalid');
  for (const el of form.querySelectorAll('.field-error')) el.textContent = '';
  const box = form.querySelector('.form-error');
  if (box) box.textContent = '';
}

export function showError(form, err) {
  const message = errorMessage(err);
  const param = err && (err.param || err.field);
  const control = param ? form.querySelector(`[name="${CSS.escape(param)}"]`) : null;
  if (control) {
    control.setAttribute('aria-invalid', 'true');
    const slot = control.closest('.field')?.querySelector('.field-error');
    if (slot) slot.textContent = message;
  }
  const box = form.querySelector('.form-error');
  if (box) box.textContent = message;
  else toast(message, 'error');
  (control || form.querySelector('input, select, button'))?.focus();
}

/** A form whose submit calls `onSubmit(values, form)`; API errors show in the form. */
export function form(props, children, onSubmit) {
  const el = h('form', { novalidate: true, ...props },
    children,
    h('p', { class: 'form-error', role: 'alert' }));
  el.addEventListener('submit', async (event) => {
    event.preventDefault();
    if (el.getAttribute('aria-busy') === 'true') return;
    clearErrors(el);
    const invalid = [...el.elements].find((c) => c.willValidate && !c.checkValidity());
    if (invalid) {
      showError(el, { param: invalid.name, message: invalid.validationMessage });
      return;
    }
    const buttons = el.querySelectorAll('button[type="submit"]');
    for (const b of buttons) b.disabled = true;
    el.setAttribute('aria-busy', 'true');
    try {
      await onSubmit(values(el), el);
    } catch (err) {
      if (el.isConnected) showError(el, err);
      else toast(errorMessage(err), 'error');
    } finally {
      for (const b of buttons) b.disabled = false;
      el.removeAttribute('aria-busy');
    }
  });
  return el;
}

function values(formEl) {
  const out = {};
  for (const [key, value] of new FormData(formEl)) {
    if (key in out) out[key] = [].concat(out[key], value);
    else out[key] = value;
  }
  return out;
}

/** Field-level error for a value the script itself refuses (e.g. a malformed amount). */
export function fieldError(param, err) {
  return Object.assign(new RangeError(err.message || String(err)), { param });
}

// --- buttons -------------------------------------------------------------------------------------
export function button(label, onClick, opts = {}) {
  const el = h('button', { type: opts.type || 'button', class: ['btn', opts.kind, opts.size], 'aria-label': opts.ariaLabel, dataset: opts.focusKey ? { focusKey: opts.focusKey } : undefined }, label);
  if (onClick) {
    el.addEventListener('click', async () => {
      if (el.disabled) return;
      el.disabled = true;
      try {
        await onClick(el);
      } catch (err) {
        toast(errorMessage(err), 'error');
      } finally {
        el.disabled = false;
      }
    });
  }
  return el;
}

export function submit(label, kind = 'primary') {
  return h('button', { type: 'submit', class: ['btn', kind] }, label);
}

async function writeClipboard(text) {
  if (navigator.clipboard && window.isSecureContext) {
    await navigator.clipboard.writeText(text);
    return;
  }
  const area = h('textarea', { class: 'sr-only', readOnly: true, 'aria-hidden': 'true' });
  area.value = text;
  document.body.append(area);
  area.select();
  const ok = document.execCommand('copy');
  area.remove();
  if (!ok) throw new Error('copying is blocked here; select the text and copy it by hand');
}

export function copyButton(getText, label = 'Copy') {
  const el = h('button', { type: 'button', class: 'btn' }, label);
  el.addEventListener('click', async () => {
    try {
      await writeClipboard(typeof getText === 'function' ? getText() : getText);
      el.textContent = 'Copied';
      toast('Copied to the clipboard.');
      setTimeout(() => { el.textContent = label; }, 2000);
    } catch (err) {
      toast(errorMessage(err), 'error');
    }
  });
  return el;
}

/** A read-only value with a copy button (secrets, URLs). */
export function copyable(value, label) {
  const id = uid('copy');
  const input = h('input', { id, type: 'text', readOnly: true, value, 'aria-label': label, spellcheck: 'false', onFocus: (e) => e.target.select() });
  return h('div', { class: 'secret' }, input, copyButton(() => input.value));
}

// --- layout pieces -------------------------------------------------------------------------------
export function pageHead(title, sub, ...actions) {
  return h('header', { class: 'page-head' },
    h('div', {}, h('h1', { tabindex: '-1' }, title), sub ? h('p', { class: 'sub' }, sub) : null),
    actions.length ? h('div', { class: 'row' }, actions) : null);
}

export function card(title, desc, body, opts = {}) {
  return h('section', { class: 'card', 'aria-labelledby': opts.id ? `${opts.id}-title` : undefined, id: opts.id },
    title ? h('div', { class: 'card-head' },
      h('div', {}, h('h2', { id: opts.id ? `${opts.id}-title` : undefined }, title), desc ? h('p', {}, desc) : null),
      opts.actions || null) : null,
    h('div', { class: ['card-body', opts.flush && 'flush'] }, body));
}

export function stat(label, value, opts = {}) {
  const val = opts.href
    ? h('a', { class: 'value', href: opts.href, title: opts.title }, value)
    : h('span', { class: 'value', title: opts.title }, value);
  return h('div', { class: 'card stat', dataset: { stat: opts.key || label } },
    h('span', { class: 'label' }, label), val,
    opts.hint ? h('span', { class: 'hint' }, opts.hint) : null,
    opts.meter !== undefined ? meter(opts.meter, opts.meterLabel || label, opts.meterNeutral) : null);
}

/** A bar of `pct` percent; it turns amber at 80 and red at 100 unless `neutral`. */
export function meter(pct, label, neutral = false) {
  const clamped = Math.max(0, Math.min(100, pct));
  const bar = h('span');
  bar.style.width = `${clamped}%`;
  const level = neutral ? null : pct >= 100 ? 'full' : pct >= 80 && 'high';
  return h('div', { class: ['meter', level], role: 'meter', 'aria-label': label,
    'aria-valuemin': '0', 'aria-valuemax': '100', 'aria-valuenow': String(Math.round(clamped)) }, bar);
}

export function empty(title, text, action) {
  return h('div', { class: 'empty' }, h('strong', {}, title), text ? h('p', {}, text) : null, action || null);
}

export function notice(kind, ...children) {
  return h('div', { class: ['notice', kind], role: kind === 'danger' ? 'alert' : undefined }, children);
}

/**
 * columns: [{label, num?, cell: (row) => node|string, srOnly?}]; rows: array.
 * Returns the table (or `emptyNode` when there are no rows).
 */
export function table(columns, rows, opts = {}) {
  if (!rows.length && opts.empty) return opts.empty;
  return h('div', { class: 'table-wrap' }, h('table', {},
    opts.caption ? h('caption', { class: 'sr-only' }, opts.caption) : null,
    h('thead', {}, h('tr', {}, columns.map((c) => h('th', { scope: 'col', class: c.num ? 'num' : undefined },
      c.srOnly ? h('span', { class: 'sr-only' }, c.label) : c.label)))),
    h('tbody', {}, rows.map((row) => h('tr', { dataset: opts.rowKey ? { row: opts.rowKey(row) } : undefined },
      columns.map((c) => h('td', { class: [c.num && 'num', c.actions && 'actions'] }, c.cell(row)))))),
    opts.foot ? h('tfoot', {}, h('tr', {}, columns.map((c, i) => h('td', { class: c.num ? 'num' : undefined }, opts.foot(c, i))))) : null));
}

export function roleBadge(role) {
  return h('span', { class: ['badge', role] }, role);
}

// --- dialogs -------------------------------------------------------------------------------------
/** A modal <dialog>: focus moves in, Escape closes, focus returns to the opener. */
export function modal(title, build) {
  const opener = document.activeElement;
  const titleId = uid('dlg');
  const dlg = h('dialog', { 'aria-labelledby': titleId });
  const close = () => dlg.close();
  dlg.append(h('div', { class: 'dialog-body' }, h('h2', { id: titleId }, title), build(close)));
  dlg.addEventListener('close', () => {
    dlg.remove();
    if (opener && opener.isConnected) opener.focus();
  });
  document.body.append(dlg);
  dlg.showModal();
  return dlg;
}

export function confirm(title, text, confirmLabel, opts = {}) {
  return new Promise((resolve) => {
    let answer = false;
    const dlg = modal(title, (close) => [
      h('p', {}, text),
      h('div', { class: 'dialog-actions' },
        button('Cancel', () => close()),
        button(confirmLabel, () => { answer = true; close(); }, { kind: opts.danger ? 'danger solid' : 'primary' })),
    ]);
    dlg.addEventListener('close', () => resolve(answer));
  });
}

// --- dates ---------------------------------------------------------------------------------------
const dateFmt = new Intl.DateTimeFormat(undefined, { dateStyle: 'medium' });
const dateTimeFmt = new Intl.DateTimeFormat(undefined, { dateStyle: 'medium', timeStyle: 'short' });
const relFmt = new Intl.RelativeTimeFormat(undefined, { numeric: 'auto' });

/** An ISO 8601 string, or unix seconds (a number). */
function toDate(value) {
  return typeof value === 'number' ? new Date(value * 1000) : new Date(value);
}

export function date(iso) {
  if (!iso && iso !== 0) return '—';
  const d = toDate(iso);
  return Number.isNaN(d.getTime()) ? String(iso) : dateFmt.format(d);
}

export function when(iso, never = 'never') {
  if (!iso) return h('span', { class: 'muted' }, never);
  const d = toDate(iso);
  if (Number.isNaN(d.getTime())) return String(iso);
  const seconds = (d.getTime() - Date.now()) / 1000;
  const steps = [[60, 'second'], [3600, 'minute'], [86400, 'hour'], [86400 * 30, 'day'], [86400 * 365, 'month']];
  let text = dateFmt.format(d);
  for (let i = 0; i < steps.length; i += 1) {
    if (Math.abs(seconds) < steps[i][0]) {
      const unitSeconds = i === 0 ? 1 : steps[i - 1][0];
      text = relFmt.format(Math.round(seconds / unitSeconds), steps[i][1]);
      break;
    }
  }
  return h('time', { datetime: d.toISOString(), title: dateTimeFmt.format(d) }, text);
}

export function utcToday() {
  return new Date().toISOString().slice(0, 10);
}

export function plural(n, one, many = `${one}s`) {
  return `${n} ${Number(n) === 1 ? one : many}`;
}
