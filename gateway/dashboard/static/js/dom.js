// Tiny DOM builders. Text always goes in as text nodes (never parsed as HTML).

const SVG_NS = 'http://www.w3.org/2000/svg';
const PROPS = new Set([
  'value', 'checked', 'disabled', 'hidden', 'selected', 'required', 'readOnly', 'multiple',
  'tabIndex', 'defaultValue',
]);

export function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : String(child));
  }
  return el;
}

function apply(el, props) {
  for (const [key, value] of Object.entries(props || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key === 'class') el.className = Array.isArray(value) ? value.filter(Boolean).join(' ') : value;
    else if (key === 'text') el.textContent = value;
    else if (key === 'dataset') Object.assign(el.dataset, value);
    else if (key.startsWith('on') && typeof value === 'function') {
      el.addEventListener(key.slice(2).toLowerCase(), value);
    } else if (PROPS.has(key)) el[key] = value;
    else el.setAttribute(key, value === true ? '' : String(value));
  }
}

/** h('button', {class: 'btn', onClick}, 'Save') — children first, so a select's value sticks. */
export function h(tag, props, ...children) {
  const el = document.createElement(tag);
  append(el, children);
  apply(el, props);
  return el;
}

export function svg(tag, props, ...children) {
  const el = document.createElementNS(SVG_NS, tag);
  for (const [key, value] of Object.entries(props || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key === 'class') el.setAttribute('class', value);
    else if (key === 'text') el.textContent = value;
    else if (key.startsWith('on') && typeof value === 'function') {
      el.addEventListener(key.slice(2).toLowerCase(), value);
    } else el.setAttribute(key, String(value));
  }
  return append(el, children);
}

let counter = 0;
export function uid(prefix = 'f') {
  counter += 1;
  return `${prefix}-${counter}`;
}

/** Replace `target`'s content with `node`, keeping keyboard focus on the equivalent control. */
export function swap(target, ...nodes) {
  const active = document.activeElement;
  const key = active && target.contains(active) ? active.dataset.focusKey : undefined;
  target.replaceChildren(...nodes.flat().filter(Boolean));
  if (key) {
    const again = target.querySelector(`[data-focus-key="${CSS.escape(key)}"]`);
    if (again) again.focus({ preventScroll: true });
  }
}
