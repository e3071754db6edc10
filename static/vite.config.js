import { defineConfig } from "vite";

// The gateway serves the built page at / and its assets under /static/.
export default defineConfig({
  base: "/static/",
  build: { outDir: "dist", emptyOutDir: true, chunkSizeWarningLimit: 2000 },
});
