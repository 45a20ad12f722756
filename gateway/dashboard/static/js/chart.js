// Spend per day as an inline SVG bar chart. Amounts stay BigInt nano-dollars; only pixel
// geometry uses Numbers.

import { h, svg } from './dom.js';
import { toNanos, usd } from './money.js';

const W = 960;
const H = 260;
const PAD = { left: 72, right: 12, top: 14, bottom: 30 };
const dayFmt = new Intl.DateTimeFormat(undefined, { month: 'short', day: 'numeric', timeZone: 'UTC' });

/** Every UTC day from `from` to `to` inclusive, as YYYY-MM-DD. */
export function daysBetween(from, to) {
  const out = [];
  const end = Date.parse(`${to}T00:00:00Z`);
  for (let t = Date.parse(`${from}T00:00:00Z`); t <= end && out.length < 1000; t += 86400000) {
    out.push(new Date(t).toISOString().slice(0, 10));
  }
  return out;
}

/** A round grid step (1, 2 or 5 times a power of ten nanos) giving at most 4 divisions. */
function niceStep(max) {
  const raw = max > 0n ? (max + 3n) / 4n : 250_000n; // an empty chart still spans $0.001
  const magnitude = 10n ** BigInt(raw.toString().length - 1);
  for (const m of [1n, 2n, 5n]) {
    if (magnitude * m >= raw) return magnitude * m;
  }
  return magnitude * 10n;
}

/** Decimals that show `step` (and so every tick) exactly: cents, or more for tiny amounts. */
function decimalsFor(step) {
  let zeros = 0;
  for (let v = step; v % 10n === 0n && zeros < 9; v /= 10n) zeros += 1;
  return Math.max(2, 9 - zeros);
}

/**
 * rows: report rows grouped by day ({group: 'YYYY-MM-DD', charged_usd, requests}).
 * Returns a figure: the chart, a line that names the hovered day, and the data as a table.
 */
export function spendChart(rows, from, to) {
  const byDay = new Map(rows.map((r) => [r.group, r]));
  const days = daysBetween(from, to);
  const values = days.map((d) => toNanos(byDay.get(d)?.charged_usd) ?? 0n);
  const max = values.reduce((a, b) => (b > a ? b : a), 0n);
  const step = niceStep(max);
  const divisions = max > 0n ? Number((max + step - 1n) / step) : 4;
  const top = step * BigInt(divisions);
  const plotW = W - PAD.left - PAD.right;
  const plotH = H - PAD.top - PAD.bottom;
  const slot = plotW / Math.max(days.length, 1);
  const gap = Math.min(4, slot * 0.2);
  const tip = h('p', { class: 'chart-tip', 'aria-hidden': 'true' }, 'Point at a bar to see the day.');
  const tickDecimals = decimalsFor(step);

  const grid = Array.from({ length: divisions + 1 }, (_, i) => {
    const value = step * BigInt(i);
    const y = PAD.top + plotH - (plotH * i) / divisions;
    return svg('g', {},
      svg('line', { class: 'grid', x1: PAD.left, x2: W - PAD.right, y1: y, y2: y }),
      svg('text', { class: 'axis-label', x: PAD.left - 8, y: y + 4, 'text-anchor': 'end' },
        usd(value, { min: 2, max: tickDecimals })));
  });
  const labelEvery = Math.max(1, Math.ceil(days.length / 12));
  const bars = days.map((day, i) => {
    const value = values[i];
    const ratio = top > 0n ? Number((value * 100000n) / top) / 100000 : 0;
    const height = value > 0n ? Math.max(1.5, ratio * plotH) : 1;
    const x = PAD.left + i * slot + gap / 2;
    const row = byDay.get(day);
    const text = `${dayFmt.format(new Date(`${day}T00:00:00Z`))}: ${usd(value)} · ${row ? row.requests : 0} requests`;
    const bar = svg('rect', {
      class: value > 0n ? 'bar' : 'bar zero', x: x.toFixed(2), y: (PAD.top + plotH - height).toFixed(2),
      width: Math.max(1, slot - gap).toFixed(2), height: height.toFixed(2), rx: Math.min(3, slot / 4).toFixed(2),
      'data-day': day, 'data-nanos': value.toString(),
      onMouseenter: () => { tip.textContent = text; },
    }, svg('title', { text }));
    const label = i % labelEvery === 0
      ? svg('text', { class: 'axis-label', x: (x + (slot - gap) / 2).toFixed(2), y: H - 10, 'text-anchor': 'middle' },
        dayFmt.format(new Date(`${day}T00:00:00Z`)))
      : null;
    return svg('g', {}, bar, label);
  });
  const total = values.reduce((a, b) => a + b, 0n);
  const busiest = days[values.indexOf(max)];
  const summary = max > 0n
    ? `Spend per day from ${from} to ${to}: ${usd(total)} in total; the highest day was ${busiest} with ${usd(max)}.`
    : `No spend from ${from} to ${to}.`;
  const emptyLabel = max > 0n ? null : svg('text', { class: 'empty-label', x: PAD.left + plotW / 2, y: PAD.top + plotH / 2, 'text-anchor': 'middle' }, 'No spend in this range');
  const chart = svg('svg', { class: 'chart', viewBox: `0 0 ${W} ${H}`, role: 'img', 'aria-label': summary, preserveAspectRatio: 'xMidYMid meet' },
    ...grid, ...bars, emptyLabel);
  chart.addEventListener('mouseleave', () => { tip.textContent = 'Point at a bar to see the day.'; });
  const dataTable = h('details', {},
    h('summary', {}, 'Show the days as a table'),
    h('div', { class: 'table-wrap' }, h('table', {},
      h('thead', {}, h('tr', {}, h('th', { scope: 'col' }, 'Day'), h('th', { scope: 'col', class: 'num' }, 'Requests'), h('th', { scope: 'col', class: 'num' }, 'Charged'))),
      h('tbody', {}, days.filter((d) => byDay.has(d)).map((d) => h('tr', {},
        h('td', {}, d), h('td', { class: 'num' }, String(byDay.get(d).requests)), h('td', { class: 'num' }, usd(byDay.get(d).charged_usd))))))));
  return h('figure', { class: 'chart-figure' }, chart, tip, dataTable);
}
