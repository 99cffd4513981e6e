// The page of zoo.app: shows an open image on a canvas, sends boxes and clicks to the server, draws the masks.
// Plain JS, no build step, nothing fetched from elsewhere. The server holds the image, its embeddings and the
// objects; the page holds what is on screen (slices and label slices it fetched) and the view.
"use strict";
(() => {
  const $ = (id) => document.getElementById(id);
  const HEADERS = { "X-Requested-With": "cp-tinyvit" };  // the server refuses changes without it
  const SLICE_CACHE = 64;  // slices kept on the page (a volume's others are fetched again)

  const state = {
    info: null,  // /api/info: model, clicks, presets
    image: null,  // the open image: /api/images' answer (session, size, window, names)
    z: 0,
    level: 127.5, width: 255,
    zoom: 1, panX: 0, panY: 0,
    tool: "box",
    selected: null,  // object id
    objects: [],
    slices: new Map(),  // z -> typed array of the slice as stored (H*W or H*W*3)
    labels: new Map(),  // z -> Uint16Array of object ids (H*W)
    drag: null,  // {kind: 'box'|'pan'|'window'|'click', ...}
    busy: false,
    space: false,
    lastAnswer: null,  // {ms, server_ms, encoder_runs, object}
  };
  const canvas = $("view");
  const ctx = canvas.getContext("2d");
  const imageLayer = document.createElement("canvas");  // the slice, windowed, one pixel per image pixel
  const labelLayer = document.createElement("canvas");  // the objects' colours, one pixel per image pixel

  // Messages and the server.

  function say(text, kind = "info") {
    const box = $("message");
    box.textContent = text;
    box.className = kind;
  }

  function busy(on, text) {
    state.busy = on;
    $("busy").hidden = !on;
    if (text) $("busy").textContent = text;
  }

  async function problem(response) {
    try {
      return (await response.json()).error || `${response.status} ${response.statusText}`;
    } catch {
      return `${response.status} ${response.statusText}`;
    }
  }

  async function api(method, url, body) {
    const options = { method, headers: { ...HEADERS } };
    if (body !== undefined) {
      options.headers["Content-Type"] = "application/json";
      options.body = JSON.stringify(body);
    }
    let response;
    try {
      response = await fetch(url, options);
    } catch {
      throw new Error("the server cannot be reached (was it stopped?)");
    }
    if (!response.ok) throw new Error(await problem(response));
    return response;
  }

  const sessionUrl = (path) => `/api/images/${state.image.session}${path}`;

  // Opening an image.

  function upload(file) {  // XMLHttpRequest: fetch cannot report upload progress
    return new Promise((resolve, reject) => {
      const bar = $("upload");
      const xhr = new XMLHttpRequest();
      xhr.open("POST", "/api/images?name=" + encodeURIComponent(file.name));
      for (const [key, value] of Object.entries(HEADERS)) xhr.setRequestHeader(key, value);
      xhr.responseType = "json";
      bar.hidden = false;
      bar.value = 0;
      xhr.upload.onprogress = (e) => {
        if (e.lengthComputable) { bar.max = e.total; bar.value = e.loaded; }
      };
      xhr.upload.onload = () => busy(true, `reading ${file.name}…`);
      xhr.onloadend = () => { bar.hidden = true; };
      xhr.onload = () => {
        if (xhr.status === 200) resolve(xhr.response);
        else reject(new Error((xhr.response && xhr.response.error) || `opening failed (${xhr.status})`));
      };
      xhr.onerror = () => reject(new Error("the server cannot be reached (was it stopped?)"));
      xhr.send(file);
    });
  }

  function closeSession(keepalive = false) {
    if (!state.image) return;
    fetch(sessionUrl(""), { method: "DELETE", headers: HEADERS, keepalive }).catch(() => {});
  }

  async function openFile(file) {
    if (!file || state.busy) return;
    const limit = state.info.max_upload_mb;
    if (file.size > limit * 2 ** 20) {
      say(`${file.name}: ${(file.size / 2 ** 20).toFixed(1)} MB, over the server's ${limit} MB upload limit ` +
          "(--max-upload-mb)", "error");
      return;
    }
    busy(true, `uploading ${file.name}…`);
    try {
      const image = await upload(file);
      closeSession();
      Object.assign(state, { image, objects: [], selected: null, slices: new Map(), labels: new Map(),
                             z: Math.floor((image.depth - 1) / 2), lastAnswer: null });
      imageLayer.width = labelLayer.width = image.width;
      imageLayer.height = labelLayer.height = image.height;
      showImageControls();
      setWindow(...image.window);
      renderObjects();
      await showSlice(state.z);
      fitView();
      $("timing").textContent = "";
      $("timing").removeAttribute("data-ms");
      const shape = image.is_3d ? `${image.depth}×${image.height}×${image.width}` : `${image.height}×${image.width}`;
      say(`Opened ${image.name} (${shape}${image.channels === 3 ? " RGB" : ""}; the model sees it ` +
          `${image.intensity === "as stored" ? "as stored" : "with " + image.intensity}). ` +
          "Drag a box around an object.");
    } catch (err) {
      say(err.message, "error");
    } finally {
      busy(false);
      $("file").value = "";
    }
  }

  function showImageControls() {
    const image = state.image;
    $("image-name").textContent = image.name;
    $("volume").hidden = !image.is_3d;
    $("slice").max = image.depth - 1;
    const auto = $("modality").options[0];
    auto.textContent = image.file_modality ? `auto: the file's (${image.file_modality})`
                                           : "auto: model's guess (none in file)";
    $("presets").hidden = !image.presets;  // CT presets: grey images stored in more than 8 bits (HU)
  }

  // Slices and labels.

  async function fetchSlice(z) {
    if (state.slices.has(z)) return state.slices.get(z);
    const response = await api("GET", sessionUrl(`/slices/${z}`));
    const buffer = await response.arrayBuffer();
    const data = response.headers.get("X-Pixel-Type") === "uint8" ? new Uint8Array(buffer) : new Float32Array(buffer);
    state.slices.set(z, data);
    if (state.slices.size > SLICE_CACHE) state.slices.delete(state.slices.keys().next().value);
    return data;
  }

  async function fetchLabels(z) {
    if (state.labels.has(z)) return state.labels.get(z);
    const response = await api("GET", sessionUrl(`/labels/${z}`));
    const labels = new Uint16Array(await response.arrayBuffer());
    state.labels.set(z, labels);
    return labels;
  }

  function unpackLabels(text) {  // base64 of little-endian uint16 -> Uint16Array
    const binary = atob(text);
    const bytes = new Uint8Array(binary.length);
    for (let i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
    return new Uint16Array(bytes.buffer);
  }

  async function showSlice(z) {
    const image = state.image;
    if (!image) return;
    z = Math.max(0, Math.min(image.depth - 1, z));
    state.z = z;
    $("slice").value = z;
    $("slice-label").textContent = `${z} / ${image.depth - 1}`;
    try {
      await Promise.all([fetchSlice(z), fetchLabels(z)]);
    } catch (err) {
      say(err.message, "error");
      return;
    }
    if (state.z !== z || state.image !== image) return;  // scrolled on meanwhile
    renderImageLayer();
    renderLabelLayer();
    draw();
    for (const next of [z + 1, z - 1]) {  // the neighbours, for smooth scrolling
      if (next >= 0 && next < image.depth) fetchSlice(next).catch(() => {});
    }
  }

  function renderImageLayer() {
    const { width: w, height: h, channels } = state.image;
    const data = state.slices.get(state.z);
    if (!data) return;
    const out = new ImageData(w, h);
    const px = out.data;  // Uint8ClampedArray: clamps and rounds
    const low = state.level - state.width / 2;
    const scale = 255 / Math.max(state.width, 1e-6);
    for (let i = 0, n = w * h; i < n; i++) {
      if (channels === 3) {
        px[4 * i] = (data[3 * i] - low) * scale;
        px[4 * i + 1] = (data[3 * i + 1] - low) * scale;
        px[4 * i + 2] = (data[3 * i + 2] - low) * scale;
      } else {
        px[4 * i] = px[4 * i + 1] = px[4 * i + 2] = (data[i] - low) * scale;
      }
      px[4 * i + 3] = 255;
    }
    imageLayer.getContext("2d").putImageData(out, 0, 0);
  }

  function renderLabelLayer() {
    const { width: w, height: h } = state.image;
    const labels = state.labels.get(state.z);
    const out = new ImageData(w, h);
    if (labels) {
      const colours = new Map(state.objects.map((o) => [o.id, o.colour]));
      const px = out.data;
      for (let y = 0; y < h; y++) {
        for (let x = 0; x < w; x++) {
          const i = y * w + x;
          const id = labels[i];
          if (!id) continue;
          const colour = colours.get(id) || [255, 255, 255];
          const edge = x === 0 || y === 0 || x === w - 1 || y === h - 1 || labels[i - 1] !== id ||
                       labels[i + 1] !== id || labels[i - w] !== id || labels[i + w] !== id;
          px[4 * i] = colour[0];
          px[4 * i + 1] = colour[1];
          px[4 * i + 2] = colour[2];
          px[4 * i + 3] = edge ? 255 : (id === state.selected ? 120 : 85);
        }
      }
    }
    labelLayer.getContext("2d").putImageData(out, 0, 0);
  }

  // The view.

  function draw() {
    const dpr = window.devicePixelRatio || 1;
    const width = Math.round(canvas.clientWidth * dpr);
    const height = Math.round(canvas.clientHeight * dpr);
    if (canvas.width !== width || canvas.height !== height) { canvas.width = width; canvas.height = height; }
    ctx.setTransform(1, 0, 0, 1, 0, 0);
    ctx.fillStyle = "#0d0e10";
    ctx.fillRect(0, 0, width, height);
    if (!state.image) return;
    const zoom = state.zoom;
    ctx.setTransform(dpr * zoom, 0, 0, dpr * zoom, dpr * state.panX, dpr * state.panY);
    ctx.imageSmoothingEnabled = zoom < 1;  // magnified: pixels stay pixels
    ctx.drawImage(imageLayer, 0, 0);
    ctx.drawImage(labelLayer, 0, 0);
    ctx.lineWidth = 1.5 / zoom;
    const is3d = state.image.is_3d;
    for (const obj of state.objects) {  // each box on the slice it prompts
      if (obj.prompt_slice !== state.z) continue;
      const [x0, y0, x1, y1] = is3d ? [obj.box[0], obj.box[1], obj.box[3], obj.box[4]] : obj.box;
      ctx.strokeStyle = `rgb(${obj.colour.join(",")})`;
      ctx.setLineDash(obj.id === state.selected ? [] : [4 / zoom, 3 / zoom]);
      ctx.strokeRect(x0, y0, x1 - x0 + 1, y1 - y0 + 1);
    }
    ctx.setLineDash([]);
    const selected = state.objects.find((o) => o.id === state.selected);
    for (const [z, x, y, positive] of selected ? selected.clicks : []) {
      if (z !== state.z) continue;
      ctx.beginPath();
      ctx.arc(x + 0.5, y + 0.5, 4 / zoom, 0, 2 * Math.PI);
      ctx.fillStyle = positive ? "#3ddc84" : "#ff5c5c";
      ctx.fill();
      ctx.strokeStyle = "#000";
      ctx.stroke();
    }
    const drag = state.drag;
    if (drag && drag.kind === "box" && drag.moved) {
      const box = dragBox(drag);
      ctx.strokeStyle = "#ffffff";
      ctx.strokeRect(box[0], box[1], box[2] - box[0] + 1, box[3] - box[1] + 1);
    }
  }

  function clientToImage(clientX, clientY) {
    const rect = canvas.getBoundingClientRect();
    return { x: (clientX - rect.left - state.panX) / state.zoom, y: (clientY - rect.top - state.panY) / state.zoom };
  }

  function imageToClient(x, y) {
    const rect = canvas.getBoundingClientRect();
    return { x: rect.left + state.panX + x * state.zoom, y: rect.top + state.panY + y * state.zoom };
  }

  function fitView() {
    if (!state.image) return;
    const { width: w, height: h } = state.image;
    const margin = 16;
    state.zoom = Math.min((canvas.clientWidth - 2 * margin) / w, (canvas.clientHeight - 2 * margin) / h);
    state.panX = (canvas.clientWidth - w * state.zoom) / 2;
    state.panY = (canvas.clientHeight - h * state.zoom) / 2;
    draw();
  }

  function zoomAt(clientX, clientY, factor) {
    const before = clientToImage(clientX, clientY);
    state.zoom = Math.max(0.05, Math.min(64, state.zoom * factor));
    const rect = canvas.getBoundingClientRect();
    state.panX = clientX - rect.left - before.x * state.zoom;
    state.panY = clientY - rect.top - before.y * state.zoom;
    draw();
  }

  function setWindow(level, width) {
    state.level = level;
    state.width = Math.max(width, 1e-6);
    $("level").value = +state.level.toFixed(2);
    $("width").value = +state.width.toFixed(2);
    if (state.image) { renderImageLayer(); draw(); }
  }

  function resetView() {
    if (!state.image) return;
    setWindow(...state.image.window);
    fitView();
  }

  // Objects.

  function renderObjects() {
    const list = $("objects");
    list.replaceChildren();
    state.objects.forEach((obj, i) => {
      const item = document.createElement("li");
      item.dataset.id = obj.id;
      item.classList.toggle("selected", obj.id === state.selected);
      const swatch = document.createElement("span");
      swatch.className = "swatch";
      swatch.style.background = `rgb(${obj.colour.join(",")})`;
      const detail = document.createElement("span");
      detail.className = "detail";
      const is3d = state.image.is_3d;
      const where = !is3d ? "" : obj.slices ? ` · slices ${obj.slices[0]}–${obj.slices[1]}` : " · empty";
      const modality = obj.modality ? ` · ${obj.modality} (${obj.modality_source})` : "";
      const clicks = obj.clicks.length ? ` · ${obj.clicks.length} click${obj.clicks.length > 1 ? "s" : ""}` : "";
      detail.textContent = `label ${i + 1}${modality} · ${obj.pixels} ${is3d ? "voxels" : "px"}${where}${clicks}`;
      detail.title = `intensity: ${obj.intensity}; modality head: ${obj.head_modality || "none"}; ` +
                     `box ${JSON.stringify(obj.box)}`;
      const undo = document.createElement("button");
      undo.textContent = "undo";
      undo.title = "Undo this object's last change (Ctrl+Z)";
      undo.disabled = obj.undo === 0;
      undo.onclick = (e) => { e.stopPropagation(); undoObject(obj.id); };
      const remove = document.createElement("button");
      remove.textContent = "delete";
      remove.title = "Delete this object (Delete)";
      remove.onclick = (e) => { e.stopPropagation(); deleteObject(obj.id); };
      item.append(swatch, detail, undo, remove);
      item.onclick = () => select(obj.id, true);
      list.append(item);
    });
  }

  function select(id, reveal = false) {
    state.selected = id;
    renderObjects();
    const obj = state.objects.find((o) => o.id === id);
    if (reveal && obj && state.image.is_3d && !(obj.slices && state.z >= obj.slices[0] && state.z <= obj.slices[1])) {
      showSlice(obj.prompt_slice);  // off screen: show the slice its box prompts
      return;
    }
    renderLabelLayer();
    draw();
  }

  // A change on the server (box, click, undo, delete): its answer replaces the objects and the slice's labels.
  // startedAt: the mouse-up of a box or click, whose answer's time is shown (null for undo and delete).
  async function change(method, path, body, startedAt = null) {
    if (!state.image) { say("Open an image first.", "error"); return; }
    if (state.busy) { say("Still working on the last request…", "error"); return; }
    const image = state.image;
    busy(true, "working…");
    const watch = image.is_3d && path === "/objects" ? setInterval(() => showProgress(image), 500) : null;
    try {
      const response = await api(method, sessionUrl(path), body);
      const reply = await response.json();
      if (state.image !== image) return;
      state.objects = reply.objects;
      state.labels = new Map([[reply.slice, unpackLabels(reply.labels)]]);  // other slices are fetched again
      if (reply.object !== null) state.selected = reply.object;
      if (!state.objects.some((o) => o.id === state.selected)) state.selected = null;
      renderObjects();
      if (reply.slice === state.z) {
        renderLabelLayer();
        draw();
      } else {
        showSlice(state.z);  // scrolled on meanwhile: fetch this slice's labels
      }
      if (startedAt !== null) requestAnimationFrame(() => {  // drawn: the frame that shows it is next
        const ms = performance.now() - startedAt;
        state.lastAnswer = { ms, server_ms: reply.server_ms, encoder_runs: reply.encoder_runs, object: reply.object };
        const runs = reply.encoder_runs;
        const embedded = runs ? `, embedding ${runs} slice${runs > 1 ? "s" : ""}` : ", embedding cached";
        $("timing").textContent = `Last answer: ${ms.toFixed(0)} ms from mouse-up to mask drawn ` +
                                  `(server ${reply.server_ms.toFixed(0)} ms${embedded}).`;
        $("timing").dataset.ms = ms.toFixed(1);
      });
      if (reply.note) say(reply.note, "info");
      else say("");
    } catch (err) {
      say(err.message, "error");
    } finally {
      clearInterval(watch);
      busy(false);
    }
  }

  async function showProgress(image) {  // a volume's box: slices embedded so far, of those it needs
    try {
      const { done, total } = await (await api("GET", `/api/images/${image.session}/progress`)).json();
      if (state.busy && total) $("busy").textContent = `propagating: embedded ${done} of ${total} slices…`;
    } catch {
      // the answer itself reports any problem
    }
  }

  function dragBox(drag) {  // inclusive pixel box [x0, y0, x1, y1] spanned by a drag, inside the image
    const { width: w, height: h } = state.image;
    const clamp = (v, hi) => Math.max(0, Math.min(hi, Math.floor(v)));
    return [clamp(Math.min(drag.start.x, drag.end.x), w - 1), clamp(Math.min(drag.start.y, drag.end.y), h - 1),
            clamp(Math.max(drag.start.x, drag.end.x), w - 1), clamp(Math.max(drag.start.y, drag.end.y), h - 1)];
  }

  function addBox(drag, startedAt) {
    const [x0, y0, x1, y1] = dragBox(drag);
    let box = [x0, y0, x1, y1];
    if (state.image.is_3d) {
      const half = Math.max(0, Math.floor(Number($("range").value) || 0));
      box = [x0, y0, Math.max(0, state.z - half), x1, y1, Math.min(state.image.depth - 1, state.z + half)];
    }
    return change("POST", "/objects", { box, modality: $("modality").value, slice: state.z }, startedAt);
  }

  function objectAt(point) {
    const labels = state.labels.get(state.z);
    const x = Math.floor(point.x), y = Math.floor(point.y);
    if (!labels || x < 0 || y < 0 || x >= state.image.width || y >= state.image.height) return null;
    return labels[y * state.image.width + x] || null;
  }

  function addClick(point, positive, startedAt) {
    if (!state.info.clicks) { say(state.info.clicks_note, "error"); return; }
    const { width: w, height: h } = state.image;
    const x = Math.floor(point.x), y = Math.floor(point.y);
    if (x < 0 || y < 0 || x >= w || y >= h) return;
    const target = state.selected ?? objectAt(point);
    if (target === null) {
      say("Select the object to correct first: click it in the list, or click its mask with the box tool.", "error");
      return;
    }
    return change("POST", `/objects/${target}/clicks`, { x, y, slice: state.z, positive }, startedAt);
  }

  const undoObject = (id) => change("POST", `/objects/${id}/undo`, { slice: state.z });
  const deleteObject = (id) => change("DELETE", `/objects/${id}?slice=${state.z}`);

  async function download(path, fallbackName) {
    if (!state.image) { say("Open an image first.", "error"); return; }
    try {
      const response = await api("GET", sessionUrl(path));
      const name = (response.headers.get("Content-Disposition") || "").match(/filename="([^"]+)"/);
      const url = URL.createObjectURL(await response.blob());
      const link = document.createElement("a");
      link.href = url;
      link.download = name ? name[1] : fallbackName;
      document.body.append(link);
      link.click();
      link.remove();
      setTimeout(() => URL.revokeObjectURL(url), 10000);
      say(`Saved ${link.download}.`);
    } catch (err) {
      say(err.message, "error");
    }
  }

  // Mouse, wheel and keys.

  canvas.addEventListener("contextmenu", (e) => e.preventDefault());

  canvas.addEventListener("pointerdown", (e) => {
    if (!state.image) return;
    canvas.setPointerCapture(e.pointerId);
    const point = clientToImage(e.clientX, e.clientY);
    const client = { x: e.clientX, y: e.clientY };
    if (e.button === 1 || (e.button === 0 && state.space)) {
      state.drag = { kind: "pan", client, pan: { x: state.panX, y: state.panY } };
    } else if (e.button === 2) {
      state.drag = { kind: "window", client, level: state.level, width: state.width };
    } else if (e.button === 0) {
      state.drag = { kind: state.tool === "box" ? "box" : "click", client, start: point, end: point, moved: false };
    }
  });

  canvas.addEventListener("pointermove", (e) => {
    const drag = state.drag;
    if (!drag) return;
    const dx = e.clientX - drag.client.x, dy = e.clientY - drag.client.y;
    if (drag.kind === "pan") {
      state.panX = drag.pan.x + dx;
      state.panY = drag.pan.y + dy;
      draw();
    } else if (drag.kind === "window") {
      setWindow(drag.level - dy * drag.width / 256, drag.width * Math.exp(dx / 200));
    } else {
      drag.end = clientToImage(e.clientX, e.clientY);
      drag.moved = drag.moved || Math.hypot(dx, dy) >= 4;
      if (drag.kind === "box") draw();
    }
  });

  canvas.addEventListener("pointerup", (e) => {
    const drag = state.drag;
    state.drag = null;
    if (!drag || !state.image) return;
    const startedAt = performance.now();  // mouse-up: the answer's time is counted from here
    if (drag.kind === "box") {
      if (drag.moved) addBox(drag, startedAt);
      else select(objectAt(drag.start));
    } else if (drag.kind === "click" && !drag.moved) {
      addClick(drag.start, state.tool === "positive", startedAt);
    }
    draw();
  });

  canvas.addEventListener("wheel", (e) => {
    if (!state.image) return;
    e.preventDefault();
    if (state.image.is_3d && !e.ctrlKey) showSlice(state.z + Math.sign(e.deltaY));
    else zoomAt(e.clientX, e.clientY, Math.exp(-e.deltaY / 500));
  }, { passive: false });

  function setTool(tool) {
    if (tool !== "box" && state.info && !state.info.clicks) { say(state.info.clicks_note, "error"); return; }
    state.tool = tool;
    for (const button of $("tools").querySelectorAll("button")) {
      button.classList.toggle("active", button.dataset.tool === tool);
    }
  }

  document.addEventListener("keydown", (e) => {
    if (e.target.closest("input, select, textarea")) return;
    const key = e.key;
    if (key === " ") { state.space = true; e.preventDefault(); return; }
    if ((e.ctrlKey || e.metaKey) && key.toLowerCase() === "z") {
      if (state.selected !== null) undoObject(state.selected);
      e.preventDefault();
      return;
    }
    if (e.ctrlKey || e.metaKey || e.altKey) return;
    const presets = Object.values(state.info ? state.info.ct_presets : {});
    const actions = {
      b: () => setTool("box"), p: () => setTool("positive"), n: () => setTool("negative"),
      ArrowUp: () => showSlice(state.z + 1), ArrowDown: () => showSlice(state.z - 1),
      PageUp: () => showSlice(state.z + 10), PageDown: () => showSlice(state.z - 10),
      Home: () => showSlice(0), End: () => showSlice(state.image.depth - 1),
      "+": () => zoomAt(...center(), 1.25), "=": () => zoomAt(...center(), 1.25), "-": () => zoomAt(...center(), 0.8),
      r: resetView, u: () => state.selected !== null && undoObject(state.selected),
      Delete: () => state.selected !== null && deleteObject(state.selected),
      Backspace: () => state.selected !== null && deleteObject(state.selected),
      s: () => download("/labels", "labels"), o: () => $("file").click(),
      Escape: () => { state.drag = null; select(null); },
    };
    const preset = Number(key) - 1;
    if (state.image && state.image.presets && preset >= 0 && preset < presets.length) setWindow(...presets[preset]);
    else if (actions[key] && (state.image || "bpno".includes(key))) actions[key]();
    else return;
    e.preventDefault();
  });

  document.addEventListener("keyup", (e) => { if (e.key === " ") state.space = false; });

  function center() {
    const rect = canvas.getBoundingClientRect();
    return [rect.left + rect.width / 2, rect.top + rect.height / 2];
  }

  // Controls.

  $("file").addEventListener("change", (e) => openFile(e.target.files[0]));
  document.addEventListener("dragover", (e) => e.preventDefault());
  document.addEventListener("drop", (e) => {
    e.preventDefault();
    openFile(e.dataTransfer.files[0]);
  });
  $("slice").addEventListener("input", (e) => showSlice(Number(e.target.value)));
  $("level").addEventListener("change", () => setWindow(Number($("level").value), state.width));
  $("width").addEventListener("change", () => setWindow(state.level, Number($("width").value)));
  $("reset").addEventListener("click", resetView);
  $("save-labels").addEventListener("click", () => download("/labels", "labels"));
  $("save-overlay").addEventListener("click", () => download("/overlay", "overlay.png"));
  for (const button of $("tools").querySelectorAll("button")) {
    button.addEventListener("click", () => setTool(button.dataset.tool));
  }
  window.addEventListener("resize", draw);
  window.addEventListener("pagehide", () => closeSession(true));

  async function start() {
    try {
      state.info = await (await api("GET", "/api/info")).json();
    } catch (err) {
      say(err.message, "error");
      return;
    }
    $("model").textContent = `model: ${state.info.model}`;
    for (const name of state.info.modalities) $("modality").append(new Option(name, name));
    Object.entries(state.info.ct_presets).forEach(([name, [level, width]], i) => {
      const button = document.createElement("button");
      button.textContent = name;
      button.title = `level ${level}, width ${width} (${i + 1})`;
      button.onclick = () => setWindow(level, width);
      $("presets").append(button);
    });
    const note = $("clicks-note");
    note.textContent = state.info.clicks_note;
    note.classList.add("warning");
    if (!state.info.clicks) {
      for (const button of $("tools").querySelectorAll("button:not([data-tool=box])")) button.disabled = true;
    }
    setWindow(state.level, state.width);
    draw();
  }

  // For tests and the curious: the state, and the mapping between image pixels and the page.
  window.viewer = { state, imageToClient, clientToImage };
  start();
})();
