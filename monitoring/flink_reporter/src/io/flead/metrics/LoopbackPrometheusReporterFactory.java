package io.flead.metrics;

import org.apache.flink.metrics.MetricConfig;
import org.apache.flink.metrics.prometheus.AbstractPrometheusReporter;
import org.apache.flink.metrics.reporter.MetricReporter;
import org.apache.flink.metrics.reporter.MetricReporterFactory;

import io.prometheus.client.CollectorRegistry;
import io.prometheus.client.exporter.HTTPServer;

import java.io.IOException;
import java.lang.reflect.Field;
import java.net.InetSocketAddress;
import java.util.Properties;

/**
 * Flink's Prometheus reporter, serving on one address instead of all interfaces.
 *
 * <p>{@code org.apache.flink.metrics.prometheus.PrometheusReporter} (flink-metrics-prometheus 2.2.1) opens its HTTP
 * server on {@code new InetSocketAddress(port)}: every interface, with no option to change it. This factory builds
 * the same reporter (every metric translation is {@link AbstractPrometheusReporter}'s) and serves its registry on
 * {@code host:port} from the reporter's settings:
 *
 * <pre>
 * metrics.reporter.prom.factory.class: io.flead.metrics.LoopbackPrometheusReporterFactory
 * metrics.reporter.prom.host: 127.0.0.1
 * metrics.reporter.prom.port: 9249          (or a range, 9249-9259)
 * </pre>
 *
 * <p>Its jar goes into the same plugin folder as flink-metrics-prometheus (one class loader for both).
 */
public class LoopbackPrometheusReporterFactory implements MetricReporterFactory {

    static final String DEFAULT_HOST = "127.0.0.1";
    static final String DEFAULT_PORT = "9249";

    @Override
    public MetricReporter createMetricReporter(Properties properties) {
        MetricConfig config = (MetricConfig) properties;
        return new Reporter(config.getString("host", DEFAULT_HOST), config.getString("port", DEFAULT_PORT));
    }

    /** AbstractPrometheusReporter plus an HTTP server bound to one address. */
    static final class Reporter extends AbstractPrometheusReporter {
        private final HTTPServer server;

        /** Listens on the first free port of {@code ports} ("9249" or a range "9249-9259", one per process). */
        Reporter(String host, String ports) {
            String[] bounds = ports.trim().split("-");
            int first = Integer.parseInt(bounds[0].trim());
            int last = bounds.length > 1 ? Integer.parseInt(bounds[1].trim()) : first;
            HTTPServer started = null;
            IOException failure = null;
            for (int port = first; port <= last && started == null; port++) {
                try {
                    started = new HTTPServer(new InetSocketAddress(host, port), registryOf(this));
                    log.info("Started Prometheus reporter HTTP server on {}:{}", host, port);
                } catch (IOException e) {
                    failure = e;
                }
            }
            if (started == null) {
                throw new RuntimeException("Prometheus reporter: cannot listen on " + host + ":" + ports + " ("
                        + (failure == null ? "empty port range" : failure.getMessage())
                        + "); choose other ports with metrics.reporter.prom.port", failure);
            }
            server = started;
        }

        @Override
        public void close() {
            server.stop();
            super.close();
        }

        /** The reporter's own registry: a package-private field of AbstractPrometheusReporter (2.x). */
        private static CollectorRegistry registryOf(AbstractPrometheusReporter reporter) {
            try {
                Field field = AbstractPrometheusReporter.class.getDeclaredField("registry");
                field.setAccessible(true);
                return (CollectorRegistry) field.get(reporter);
            } catch (ReflectiveOperationException e) {
                throw new IllegalStateException("this flink-metrics-prometheus has no 'registry' field in "
                        + "AbstractPrometheusReporter; rebuild the FLEAD reporter against it (orchestration/setup.sh)", e);
            }
        }
    }
}
