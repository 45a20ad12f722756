// Billing (owners and admins view; the owner changes the subscription): plan, seats, this
// period's allowance, invoices and credit history.

import { api, enc, optional } from '../api.js';
import { h } from '../dom.js';
import { times, usd } from '../money.js';
import { card, date, empty, field, fieldError, form, notice, pageHead, stat, submit, table, toast } from '../ui.js';

function planName(id) {
  return id ? id.charAt(0).toUpperCase() + id.slice(1) : 'No plan';
}

function subscriptionForm(ctx, billing, plans) {
  const preview = h('p', { class: 'hint', 'aria-live': 'polite' });
  const options = [['', 'No subscription'], ...plans.map((p) => [p.id, `${planName(p.id)}: ${usd(p.seat_price_usd)} per seat, ${usd(p.included_usage_per_seat_usd)} usage included`])];
  const el = form({ 'aria-label': 'Change the subscription' }, [
    h('div', { class: 'form-grid' },
      field('plan', 'Plan', { options, value: billing.plan || '' }),
      field('seats', 'Seats', { type: 'number', value: String(billing.seats || 1), min: 1, max: 100000, step: 1, inputmode: 'numeric', required: true })),
    preview,
    h('div', { class: 'form-actions' }, submit('Update subscription')),
  ], async (v) => {
    const plan = v.plan || null;
    const seats = plan ? Number(v.seats) : 0;
    if (plan && (!Number.isInteger(seats) || seats < 1)) throw fieldError('seats', new Error('Enter a whole number of seats, at least 1.'));
    await api.put(`/api/teams/${enc(ctx.teamId)}/subscription`, { plan, seats });
    toast(plan ? `Subscribed to ${planName(plan)} with ${seats} seat(s).` : 'Subscription cancelled.');
    ctx.reload();
  });
  const update = () => {
    const plan = plans.find((p) => p.id === el.elements.plan.value);
    el.elements.seats.disabled = !plan;
    const seats = Number(el.elements.seats.value);
    if (!plan) {
      preview.textContent = 'Without a subscription the team spends prepaid credits only.';
    } else if (Number.isInteger(seats) && seats > 0) {
      preview.textContent = `${seats} × ${usd(plan.seat_price_usd)} = ${usd(times(plan.seat_price_usd, seats))} per month, `
        + `with ${usd(times(plan.included_usage_per_seat_usd, seats))} of usage included. More seats apply at once; fewer from next month.`;
    } else preview.textContent = '';
  };
  el.addEventListener('input', update);
  el.addEventListener('change', update);
  update();
  return el;
}

export async function render(ctx) {
  const base = `/api/teams/${enc(ctx.teamId)}`;
  const [billing, plans] = await Promise.all([
    api.get(`${base}/billing`),
    optional('/api/plans', { data: [] }),
  ]);
  const plan = billing.plan;
  const stats = h('div', { class: 'stats' },
    stat('Plan', planName(plan), { key: 'plan', hint: plan ? `${billing.seats} seat(s) · ${usd(billing.seat_price_usd)} each` : 'Credits only' }),
    stat('Allowance left', usd(billing.allowance_left_usd), { key: 'allowance', hint: `of ${usd(billing.allowance_usd)} in ${billing.period}` }),
    stat('Credits', usd(billing.credits_usd), { key: 'credits', hint: 'Prepaid, carried over' }),
    stat('Balance', usd(billing.balance_usd), { key: 'balance', hint: billing.holds_usd && !/^0\.0+$/.test(billing.holds_usd) ? `${usd(billing.holds_usd)} held by requests in flight` : 'Allowance left + credits' }));
  const invoices = table([
    { label: 'Date', cell: (i) => date(i.created_at) },
    { label: 'Period', cell: (i) => i.period },
    { label: 'Item', cell: (i) => h('div', {}, h('div', {}, `${planName(i.plan)} · ${i.seats} seat(s)`), i.note ? h('div', { class: 'secondary' }, i.note) : null) },
    { label: 'Amount', num: true, cell: (i) => usd(i.amount_usd) },
  ], billing.invoices || [], { caption: 'Invoices', empty: empty('No invoices yet', 'Each subscription change and each month of a subscription adds a line here.') });
  const credits = table([
    { label: 'Date', cell: (c) => date(c.created_at) },
    { label: 'Kind', cell: (c) => (c.kind === 'allowance' ? `Allowance ${c.period || ''}` : 'Credits') },
    { label: 'Note', cell: (c) => c.note || h('span', { class: 'muted' }, '—') },
    { label: 'Amount', num: true, cell: (c) => usd(c.amount_usd) },
  ], billing.credit_history || [], { caption: 'Credit history', empty: empty('No credits yet', 'The operator adds prepaid credits; they never expire.') });
  return {
    title: 'Billing',
    body: [
      pageHead('Billing', `Period ${billing.period}${billing.period_ends_at ? `, renews ${date(billing.period_ends_at)}` : ''}.`),
      h('div', { class: 'stack' },
        stats,
        ctx.can.manageBilling
          ? card('Subscription', 'A subscription gives the team a monthly usage allowance; spend draws it first, then credits.', subscriptionForm(ctx, billing, plans.data || []))
          : notice('info', h('p', {}, 'Only the owner changes the plan and seats.')),
        card('Invoices', null, invoices, { flush: true }),
        card('Credits and allowances', null, credits, { flush: true })),
    ],
  };
}
