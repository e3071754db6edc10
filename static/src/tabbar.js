// One tab of a tab bar (the files' and the terminals'): its name, an optional marker, and a close
// button when it can be closed.
export function tabElement({ name, selected, title, marker, onActivate, onClose, closeTitle = `Close ${name}` }) {
  const item = document.createElement("div");
  item.className = "tab";
  item.setAttribute("role", "tab");
  item.setAttribute("aria-selected", String(selected));
  if (title) item.title = title;
  const label = document.createElement("span");
  label.textContent = name;
  item.append(label);
  if (marker) item.append(marker);
  if (onClose) {
    const close = document.createElement("button");
    close.className = "quiet close";
    close.title = closeTitle;
    close.textContent = "×";
    close.addEventListener("click", (event) => (event.stopPropagation(), onClose()));
    item.append(close);
  }
  item.addEventListener("click", onActivate);
  return item;
}
