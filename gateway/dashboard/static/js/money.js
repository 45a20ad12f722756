// Money arrives as decimal strings of USD with 9 decimals ("12.500000000"). It is read into a
// BigInt of nano-dollars and formatted from that: no float ever touches an amount.

const NANOS = 1_000_000_000n;
const DECIMAL = /^([+-])?(\d*)(?:\.(\d*))?$/;

export function toNanos(value) {
  if (value === null || value === undefined || value === '') return null;
  if (typeof value === 'bigint') return value;
  const match = DECIMAL.exec(String(value).trim());
  if (!match || (!match[2] && !match[3])) return null;
  const whole = BigInt(match[2] || '0');
  const frac = BigInt((match[3] || '').slice(0, 9).padEnd(9, '0'));
  const nanos = whole * NANOS + frac;
  return match[1] === '-' ? -nanos : nanos;
}

function group(digits) {
  return digits.replace(/\B(?=(\d{3})+(?!\d))/g, ',');
}

/**
 * "$1,234.50", "$0.0044", "$0.000004": at least `min` and at most `max` decimals, rounded half
 * up on the nano-dollars; an amount too small for `max` decimals gets as many more as it takes
 * to show its first digit (up to all 9), never a "<$0.0001". Null shows as an em dash (or
 * `empty`). The exact figure is :func:`exact` (for a tooltip).
 */
export function usd(value, { min = 2, max = 4, empty = '—' } = {}) {
  const nanos = toNanos(value);
  if (nanos === null) return empty;
  const negative = nanos < 0n;
  const abs = negative ? -nanos : nanos;
  const sign = negative ? '-' : '';
  let unit = 10n ** BigInt(9 - max);
  let rounded = (abs + unit / 2n) / unit;
  while (rounded === 0n && abs > 0n && max < 9) {
    max += 1;
    unit = 10n ** BigInt(9 - max);
    rounded = (abs + unit / 2n) / unit;
  }
  const scale = 10n ** BigInt(max);
  let frac = (rounded % scale).toString().padStart(max, '0');
  while (frac.length > min && frac.endsWith('0')) frac = frac.slice(0, -1);
  const whole = group((rounded / scale).toString());
  return `${sign}$${whole}${frac ? `.${frac}` : ''}`;
}

/** Every digit: "$0.000004350" (a tooltip for a rounded amount). */
export function exact(value) {
  const nanos = toNanos(value);
  if (nanos === null) return '';
  const negative = nanos < 0n;
  const abs = negative ? -nanos : nanos;
  const frac = (abs % NANOS).toString().padStart(9, '0');
  return `${negative ? '-' : ''}$${group((abs / NANOS).toString())}.${frac}`;
}

/** Exact plain decimal for an input field: "12.500000000" -> "12.5", null -> "". */
export function plain(value) {
  const nanos = toNanos(value);
  if (nanos === null) return '';
  const negative = nanos < 0n;
  const abs = negative ? -nanos : nanos;
  let frac = (abs % NANOS).toString().padStart(9, '0').replace(/0+$/, '');
  if (frac.length === 1) frac += '0';
  return `${negative ? '-' : ''}${abs / NANOS}${frac ? `.${frac}` : ''}`;
}

/** A user's typed amount: "", "12", "12.5", "$1,000.25" -> a decimal string, or null if blank. */
export function parseAmount(text) {
  const cleaned = String(text ?? '').trim().replace(/^\$/, '').replaceAll(',', '');
  if (cleaned === '') return null;
  if (!/^\d+(\.\d{1,9})?$/.test(cleaned)) {
    throw new RangeError('Enter an amount in dollars, like 25 or 12.50 (at most 9 decimals).');
  }
  return cleaned;
}

export function sum(values) {
  return values.reduce((acc, v) => acc + (toNanos(v) ?? 0n), 0n);
}

export function times(value, count) {
  return (toNanos(value) ?? 0n) * BigInt(count);
}

/** Percentage (0..100, a Number for drawing only) of part in whole. */
export function percent(part, whole) {
  const p = toNanos(part) ?? 0n;
  const w = toNanos(whole) ?? 0n;
  if (w <= 0n) return 0;
  return Number((p * 10000n) / w) / 100;
}
