-- wrk script for bench/run.py: POST /email with a fixed JSON body.
--
--   wrk -t2 -c50 -d10s --latency -s bench/post.lua http://127.0.0.1:PORT/email \
--       [-- BUDGET [KEY_PREFIX]]
--
-- SMSP_BENCH_BODY_FILE=path (optional, environment): the body to POST instead.
-- BUDGET (optional, 0 for none): responses per thread after which the thread stops
-- sending (wrk.thread:stop()) and writes "smsp-bench: budget reached" to stderr, so
-- the caller can SIGINT wrk instead of waiting out -d.
-- KEY_PREFIX (optional): every request carries an Idempotency-Key of its own,
-- KEY_PREFIX-<thread>-<n>; without it the request is static (built once).
-- done() prints one machine-readable line to stdout:
--   SMSP_BENCH_JSON {"requests":..,"duration_us":..,"non2xx":..,...}
-- non2xx counts every response whose status is outside 200..299 (wrk's own
-- "Non-2xx or 3xx" counter lets 3xx pass).

wrk.method = "POST"
wrk.body = '{"fromaddress":"a@example.com","toaddress":"b@example.com",'
  .. '"subject":"hi","plaintextbody":"hello"}'
-- SMSP_BENCH_BODY_FILE (optional): send that file's bytes instead. Read here, at load:
-- wrk builds its request from wrk.body before init() runs.
local body_file = os.getenv("SMSP_BENCH_BODY_FILE")
if body_file and body_file ~= "" then
  local f = assert(io.open(body_file, "rb"))
  wrk.body = f:read("*a")
  f:close()
end
wrk.headers["Content-Type"] = "application/json"
wrk.headers["X-API-KEY"] = "bench"

local threads = {}

function setup(thread)
  table.insert(threads, thread)
  thread:set("thread_id", #threads)
end

-- Per-thread globals (read back from done() with thread:get()).
budget = 0
responses = 0
non2xx = 0
stopped = false

function init(args)
  budget = tonumber(args[1] or "0") or 0
  local prefix = args[2]
  if prefix ~= nil and prefix ~= "" then
    -- Defined only here: wrk builds the request once unless request() exists.
    local sent = 0
    request = function()
      sent = sent + 1
      wrk.headers["Idempotency-Key"] = prefix .. "-" .. thread_id .. "-" .. sent
      return wrk.format()
    end
  end
end

function response(status, headers, body)
  responses = responses + 1
  if status < 200 or status > 299 then
    non2xx = non2xx + 1
  end
  if budget > 0 and responses >= budget and not stopped then
    stopped = true
    io.stderr:write("smsp-bench: budget reached\n")
    io.stderr:flush()
    wrk.thread:stop()
  end
end

function done(summary, latency, requests)
  local total_non2xx, total_responses = 0, 0
  for _, t in ipairs(threads) do
    total_non2xx = total_non2xx + (tonumber(t:get("non2xx")) or 0)
    total_responses = total_responses + (tonumber(t:get("responses")) or 0)
  end
  local e = summary.errors
  io.write(string.format(
    'SMSP_BENCH_JSON {"requests":%d,"responses":%d,"duration_us":%d,"non2xx":%d,'
      .. '"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d,'
      .. '"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d,"mean_us":%.1f}\n',
    summary.requests, total_responses, summary.duration, total_non2xx,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.max, latency.mean))
end
