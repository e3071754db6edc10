// Paths of the sandbox as the page shows them: absolute, normalised by the gateway.
export const nameOf = (path) => path.slice(path.lastIndexOf("/") + 1);

export const parentOf = (path) => path.slice(0, path.lastIndexOf("/")) || "/";

// The extension of a path's name, lower-case; "" when it has none (a dotfile has none).
export function extensionOf(path) {
  const name = nameOf(path);
  const dot = name.lastIndexOf(".");
  return dot > 0 ? name.slice(dot + 1).toLowerCase() : "";
}
