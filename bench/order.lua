-- wrk script: the same partner order for every target, with a unique external_reference.
--
--   wrk -t1 -c32 -d5s --latency -s bench/order.lua URL -- PREFIX PARTNER_KEY
--
-- PREFIX must differ between wrk runs (the gateway remembers references: a repeat would be an
-- idempotent replay, not an order). Each thread adds its own number and a counter.
-- done() prints one line "BENCH_JSON {...}" that bench.py parses (latencies in microseconds).

local prefix = "bench"
local key = "bench-partner-key"
local counter = 0
local headers = {}

-- A flat partner body (~600 bytes): quantities, prices and the total as strings, as some
-- telemedicine platforms send them; the gateway (and the hand-written proxy) must fix them up.
local template = '{"external_reference": "BENCH-%s-%d-%d", "source": "bench-partner", '
  .. '"customer_name": "Erika Musterfrau", "customer_email": "erika.musterfrau@example.com", '
  .. '"customer_phone": "+49 30 12345678", "address_street": "Musterstrasse 12", '
  .. '"address_zip": "10115", "address_city": "Berlin", "address_country": "DE", '
  .. '"payment_status": "paid", "total_amount": "67.36", "cash_on_pickup": false, '
  .. '"delivery_note": "Bitte zweimal klingeln, 2. OG links", "doctor_name": "Dr. med. Beispiel", '
  .. '"items": [{"name": "Flos 22/1", "qty": "5", "price": "8.59", "p1_id": "12345"}, '
  .. '{"name": "Extrakt 25 THC", "qty": "1", "price": "24.41", "p1_id": "67890"}]}'

local threads = 0

function setup(thread)
  threads = threads + 1
  thread:set("thread_no", threads)
end

function init(args)
  prefix = args[1] or prefix
  key = args[2] or key
  headers["Content-Type"] = "application/json"
  headers["apikey"] = key
end

function request()
  counter = counter + 1
  local body = string.format(template, prefix, thread_no or 0, counter)
  return wrk.format("POST", nil, headers, body)
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests": %d, "duration_us": %d, "bytes": %d, "body_bytes": %d, '
      .. '"errors": {"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}, '
      .. '"latency_us": {"p50": %d, "p90": %d, "p99": %d, "max": %d, "mean": %.1f}}\n',
    summary.requests, summary.duration, summary.bytes,
    -- done() runs in wrk's main state, without init's prefix: a prefix of the usual length
    #string.format(template, "123456ab12-gateway-c32-r1", 1, 1000),
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.max, latency.mean
  ))
end
