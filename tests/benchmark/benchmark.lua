-- wrk script: replay pre-signed DT deliveries, one "token<TAB>body" per line of the file
-- named after `--`, each request the next line, and print the figures as one JSON line.
-- An optional second argument skips that many lines first, so a run carries on where the last stopped.
local deliveries = {}
local position = 0

function init(args)
  for line in io.lines(args[1]) do
    local tab = line:find("\t", 1, true)
    local headers = {["Content-Type"] = "application/json", ["X-Dt-Signature"] = line:sub(1, tab - 1)}
    deliveries[#deliveries + 1] = wrk.format("POST", "/", headers, line:sub(tab + 1))
  end
  position = tonumber(args[2] or "0") % #deliveries
end

function request()
  position = position % #deliveries + 1
  return deliveries[position]
end

function done(summary, latency, requests)
  local errors = summary.errors
  io.write(string.format(
    '{"requests": %d, "seconds": %f, "errors": %d, "non_2xx": %d, "p50_ms": %f, "p99_ms": %f}\n',
    summary.requests, summary.duration / 1e6,
    errors.connect + errors.read + errors.write + errors.timeout, errors.status,
    latency:percentile(50) / 1000, latency:percentile(99) / 1000))
end
